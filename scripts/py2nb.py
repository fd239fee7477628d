"""Dev helper (not part of the package): write a notebook as a jupytext percent-format script, convert it to a clean
.ipynb with stable cell ids (so nbdev's exported cell markers do not churn), then `nbdev_export --path nbs/X.ipynb`.
usage: python scripts/py2nb.py SRC.py nbs/DEST.ipynb      (or:  --back nbs/NB.ipynb SRC.py  to go ipynb -> py)"""
import sys, hashlib, jupytext, nbformat
if sys.argv[1] == '--back':
    nb = jupytext.read(sys.argv[2]); jupytext.write(nb, sys.argv[3], fmt='py:percent'); sys.exit()
src, dest = sys.argv[1], sys.argv[2]
nb = jupytext.read(src, fmt='py:percent')
nb.metadata = {'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'}}
seen = set()
for i, c in enumerate(nb.cells):
    h = hashlib.sha1(f"{i}:{c.source[:200]}".encode()).hexdigest()[:8]
    c['id'] = h
    c.metadata = {}
    if c.cell_type == 'code': c.outputs, c.execution_count = [], None
nb.nbformat, nb.nbformat_minor = 4, 5
nbformat.write(nb, dest)
