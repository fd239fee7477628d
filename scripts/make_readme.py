"""README.md from nbs/index.ipynb (nbdev's own `nbdev_readme` needs Quarto, which this project does not install).

Executes the notebook with execnb (as nbdev_test does), drops cells marked `#| hide`, keeps only the output of cells marked `#| echo: false`, strips `#|` directives,
and writes GitHub markdown with the outputs. Run by `make readme`."""
import re
import sys
from pathlib import Path

import nbformat
from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell
from nbconvert import MarkdownExporter

root = Path(__file__).resolve().parents[1]
src = root / 'nbs' / 'index.ipynb'
nb = read_nb(src)
CaptureShell(path=src.parent).run_all(nb, exc_stop=True)
cells = []
for c in nb.cells:
    lines = c.source.splitlines()
    if c.cell_type == 'code' and any(re.match(r'#\|\s*hide\b', l) for l in lines): continue
    if c.cell_type == 'code' and any(re.match(r'#\|\s*echo:\s*false\b', l) for l in lines):
        for o in c.get('outputs', []):       # only the output: markdown as markdown, anything else as text
            data = o.get('data', {})
            text = data.get('text/markdown') or data.get('text/plain') or o.get('text', '')
            text = ''.join(text) if isinstance(text, list) else text
            if text:
                md = dict(c); md.pop('outputs', None); md.pop('execution_count', None)
                md.update(cell_type='markdown', source=text if 'text/markdown' in data else f"```\n{text}\n```")
                cells.append(type(c)(c.idx_ if hasattr(c, "idx_") else 0, md))
        continue
    c.source = '\n'.join(l for l in lines if not l.startswith('#|')).strip('\n')
    if c.cell_type == 'code' and not c.source: continue
    cells.append(c)
nb.cells = cells
tmp = root / 'nbs' / '.readme_tmp.ipynb'
write_nb(nb, tmp)
try:
    body, _ = MarkdownExporter().from_notebook_node(nbformat.read(str(tmp), as_version=4))
finally:
    tmp.unlink()
body = re.sub(r'\n{3,}', '\n\n', body)
(root / 'README.md').write_text(body)
print(f'wrote README.md ({len(body.splitlines())} lines)', file=sys.stderr)
