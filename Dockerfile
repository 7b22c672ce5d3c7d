# The PerFusion image for compose's worker, trainer and generator services (see compose.yaml).
# Python packages from the lock file (torch runs on the CPU); no model or data set is downloaded at run time.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    PERFUSION_STATE_DIR=/var/lib/perfusion

WORKDIR /app

# Dependencies first, in one resolver call from the lock, so that code changes do not reinstall torch.
COPY requirements.lock ./
RUN pip install --upgrade pip && pip install -r requirements.lock

COPY . .
# Editable, so that the package finds the repo's features/ and assets/ folders beside it in /app.
RUN pip install --no-deps -e . \
    && useradd --create-home --uid 1000 perfusion \
    && mkdir -p /var/lib/perfusion \
    && chown perfusion /var/lib/perfusion

USER perfusion
EXPOSE 8000
CMD ["perfusion", "--help"]
