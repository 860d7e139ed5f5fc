#!/usr/bin/env bash
# autofaiss in its own virtualenv for benchmarks/bench_index.py: autofaiss pins
# numpy < 2, cvpipe needs numpy >= 2. Same faiss-cpu as cvpipe's, so both sides run
# the same FAISS. Usage: bash benchmarks/autofaiss_venv.sh [VENV_DIR]
set -euo pipefail
venv="${1:-$HOME/.cache/cvpipe/autofaiss-venv}"
faiss_version="$(python -c 'import faiss; print(faiss.__version__)')"
python -m venv "$venv"
# pyarrow >= 18 needs numpy >= 2, which autofaiss refuses.
"$venv/bin/pip" install -q "autofaiss==2.18.0" "faiss-cpu==${faiss_version}" "pyarrow<18"
echo "autofaiss python: $venv/bin/python"
