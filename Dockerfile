# The AWS Batch training image (training.aws_batch.job_definition): this repository after its own
# set-up (scripts/setup.sh: the pins of pyproject.toml, the jars of jvm/pom.xml, the same version
# checks), without the dev tools or the online store. jobs/aws_batch.py overrides the command with
#   ./spark-submit.sh train --runner local --input s3://... --output s3://... --model M --set ...
# run from WORKDIR; the image's conf/ gives the defaults, the runner sends the settings that matter.
#
#   docker build -t carousel-train:$(git rev-parse --short HEAD) .
#   docker tag/push it to ECR and name it in the Batch job definition (README: "Training on AWS Batch")
#
# Credentials come from the Batch job role (the AWS SDKs' chain), never from the image.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: the virtualenv and the jars, resolved as `make setup` does -------------------------
FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends openjdk-17-jdk-headless maven \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/carousel
COPY . .
RUN CAROUSEL_PYTHON=/usr/local/bin/python3.11 CAROUSEL_SETUP_EXTRAS= CAROUSEL_SETUP_ONLINE_STORE=skip \
    scripts/setup.sh \
 && rm -rf /root/.m2 /root/.cache jvm/target

# --- runtime: a JRE, the project, its virtualenv and jars ----------------------------------------
FROM ${PYTHON_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends openjdk-17-jre-headless \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 carousel
WORKDIR /opt/carousel
COPY --from=build --chown=carousel:carousel /opt/carousel /opt/carousel
USER carousel
# No ENTRYPOINT: Batch's command override is the whole command line.
CMD ["./spark-submit.sh", "--help"]
