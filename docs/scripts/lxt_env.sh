#!/usr/bin/env bash
# Build the side environment in which docs/scripts/lxt_reference.py runs lxt 2.1 (the AttnLRP authors'
# package), which needs transformers 4 and patches torch.nn classes process-wide, so it never runs in
# gmar's own test process.
#
#     bash docs/scripts/lxt_env.sh DIR            # ~30-60 s from wheels
#     PYTHONPATH=DIR python docs/scripts/lxt_reference.py --out tests/data/lxt_vit_b_16.pt
#
# DIR is a plain `pip install --target` folder, used by gmar's own interpreter with DIR first on
# PYTHONPATH: torch, torchvision, numpy, pillow, safetensors and tqdm come from that interpreter (gmar's
# dependencies and its torchvision extra); DIR holds lxt, zennit, transformers 4 and everything they
# import beyond those, so the newer transformers/huggingface_hub of gmar's environment are shadowed.
# Every version is pinned; --no-deps keeps pip from pulling a second torch.
# PYTHON (default: python) is the interpreter whose pip is used; it must be the one that runs the script.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
DIR=$1
PYTHON=${PYTHON:-python}

"$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --target "$DIR" \
    "lxt==2.1" \
    "zennit==0.5.1" \
    "transformers==4.57.6" \
    "huggingface_hub==0.36.2" \
    "tokenizers==0.22.2" \
    "requests==2.34.2" \
    "charset_normalizer==3.5.3" \
    "idna==3.20" \
    "urllib3==2.8.0" \
    "certifi==2026.10.19.post1" \
    "filelock==4.3.1" \
    "fsspec==2026.9.0" \
    "packaging==26.4" \
    "PyYAML==6.0.4" \
    "regex==2026.11.19" \
    "typing_extensions==4.16.0" \
    "click==8.5.1"

PYTHONPATH="$DIR${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" - <<'EOF'
import lxt.efficient  # noqa: F401  (imports transformers 4's model modules)
import torch, torchvision, transformers, zennit  # noqa: E401
from importlib.metadata import version
print("lxt", version("lxt"), "zennit", version("zennit"), "transformers", transformers.__version__,
      "torch", torch.__version__, "torchvision", torchvision.__version__)
EOF
