# CUDA PyTorch base image; the project itself needs only the pure-Python packages below on top of it.
# Its torch 2.5.1 (Python 3.11) is the project's torch floor, the oldest release the test suite
# runs against (requirements.txt, constraints-oldest.txt); tests/test_versions.py keeps the two equal.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DNNLIB_CACHE_DIR=/cache/dnnlib

WORKDIR /workspace
COPY requirements.txt requirements-dev.txt ./
# torch comes with the base image; pip keeps it (the requirements are lower bounds).
RUN pip install --no-cache-dir -r requirements-dev.txt
COPY . .

# Example: docker run --gpus all -v $PWD/data:/data -v $PWD/runs:/runs IMAGE \
#   torchrun --standalone --nproc_per_node=8 train.py --outdir=/runs --data=/data/cifar10-32x32.zip --cond=0 --arch=ddpmpp
CMD ["python", "-m", "pytest", "-q"]
