# atlasflow Airflow image: `astro dev start` builds this file from the project root; plain Docker users
# build it with `docker build -t atlasflow .`. Official Airflow 3.3.2 image, Python 3.11 (the pins
# need 3.11), plus packages.txt, the exact pins of requirements.txt and the atlasflow package.
# Not built in CI (no Docker engine there): tests/test_docker.py checks it statically (and hadolint).
FROM apache/airflow:3.3.2-python3.11

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# the official image's users by number: root, and airflow (uid 50000, group root)
USER 0
# OS packages, one per line, comments allowed (Astro's packages.txt format)
COPY packages.txt /tmp/packages.txt
RUN apt-get update \
 && grep -vE '^[[:space:]]*(#|$)' /tmp/packages.txt | xargs -r apt-get install -y --no-install-recommends \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /tmp/packages.txt
USER 50000

# torch first and alone from the CPU index (pinned exactly; the CUDA build is multi-GB). For GPU
# Airflow workers pass --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 (training
# normally runs on SLURM nodes, which have their own environment: slurm.python / slurm.env_activate).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY --chown=50000:0 requirements.txt /opt/atlasflow/requirements.txt
RUN grep -E '^torch==' /opt/atlasflow/requirements.txt | xargs pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
 && pip install --no-cache-dir -r /opt/atlasflow/requirements.txt

# The library (include/atlasflow) as a package, without touching the pins above
COPY --chown=50000:0 pyproject.toml README.md /opt/atlasflow/
COPY --chown=50000:0 include/ /opt/atlasflow/include/
RUN pip install --no-cache-dir --no-deps /opt/atlasflow

# DAGs, plugins, default config and Airflow objects (astro dev start mounts these over the copies)
COPY --chown=50000:0 dags/ ${AIRFLOW_HOME}/dags/
COPY --chown=50000:0 plugins/ ${AIRFLOW_HOME}/plugins/
COPY --chown=50000:0 include/config/ ${AIRFLOW_HOME}/include/config/
COPY --chown=50000:0 airflow_settings.yaml ${AIRFLOW_HOME}/airflow_settings.yaml
ENV ATLASFLOW_CONFIG=${AIRFLOW_HOME}/include/config/atlasflow.yaml \
    AIRFLOW__CORE__LOAD_EXAMPLES=False
