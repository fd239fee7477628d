"""Print lmms-eval's install requirements minus torchvision (and packages that hard-require it), one per line.

Why: on a CPU-only torch build the registry's torchvision wheel is CUDA-built and fails to import
("operator torchvision::nms does not exist"); transformers imports torchvision whenever it is installed, so it then
fails too. lmms-eval's core (api, evaluator, CLI) does not need torchvision. `make eval-venv` installs lmms-eval with
`--no-deps`, then these requirements, with torch held at the installed build (`hold`). Where torchvision works (a GPU box
with matching wheels) `pip install -e .[eval]` is the plain route.
"""
import configparser, re, sys
from importlib.metadata import requires, PackageNotFoundError
from pathlib import Path

DROP = {"torchvision", "timm"}   # timm requires torchvision; lmms-eval imports it only in model files we do not use
# lmms-eval 0.7.3's evaluator imports `filelock._api`, which filelock 4 no longer has
CONSTRAINTS = ["filelock<4"]

def hold()->list:
    "Constraints for the install: torch held at the installed build, and CONSTRAINTS."
    import torch
    return [f"torch=={torch.__version__}", *CONSTRAINTS]

def pin()->str:
    "The `.[eval]` extra of settings.ini (the lmms-eval pin)."
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(Path(__file__).resolve().parent.parent / "settings.ini", encoding="utf-8")
    return cfg["DEFAULT"]["eval_requirements"]

def eval_requirements(dist:str="lmms-eval")->list:
    try: reqs = requires(dist) or []
    except PackageNotFoundError: sys.exit(f"{dist} is not installed: run `pip install --no-deps {dist}==<pin>` first")
    out = []
    for r in reqs:
        if "extra ==" in r.replace('"', "'").replace("extra==", "extra =="): continue   # optional extras only
        name = re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0]
        if name.lower().replace("_", "-") in DROP: continue
        out.append(r)
    return list(dict.fromkeys(out + CONSTRAINTS))

if __name__ == "__main__":
    # `pin`: the extra's requirement (lmms-eval==X); `hold`: constraints; otherwise lmms-eval's requirements minus DROP
    mode = sys.argv[1] if len(sys.argv) > 1 else "requirements"
    if mode not in ("pin", "hold", "requirements"): sys.exit(f"usage: {sys.argv[0]} [pin|hold|requirements]")
    print(pin() if mode == "pin" else "\n".join(hold() if mode == "hold" else eval_requirements()))
