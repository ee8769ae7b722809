#!/usr/bin/env bash
# Wheels for a host with no package index (a hospital's air-gapped GPU server, a cluster without
# internet) that already has Python and the JAX stack (jax with its accelerator plugin, flax,
# optax, orbax-checkpoint, numpy, scipy, matplotlib): the rest of what `python -m liverjax.main`
# (building the records too), `liverjax.evaluate`, `liverjax.benchmark` and `liverjax.serve`
# import. Run it where pip reaches an index; copy DIR over; install there with
#
#   python3 -m pip install --no-index --no-deps --target SITE DIR/*.whl && export PYTHONPATH=SITE
#   (or, into the host's environment: python3 -m pip install --no-index --no-deps DIR/*.whl)
#
#   launch/offline_wheels.sh DIR [HOST_PACKAGES]
#
# HOST_PACKAGES: the host's `python3 -m pip list --format=freeze` (or one name a line): packages
# it already has are not fetched. Settings: PYTHON_VERSION (3.12), PLATFORM (manylinux x86_64;
# e.g. PLATFORM=aarch64 for Arm hosts), PYTHON (python3, with pip, here).
#
# The list below is what those commands import beyond the JAX stack, unpinned (the newest
# release for that Python): tests/test_launch.py checks it against pyproject.toml's
# dependencies. Not in it: tensorflow (export only), apache-beam (Beam builds) and mlcroissant
# (the `tfds build` command line). Pure-Python packages published only as source (promise) are
# built into wheels here.
set -euo pipefail

usage="usage: $0 DIR [HOST_PACKAGES]"
dir="${1:?$usage}"
host="${2:-}"
python="${PYTHON:-python3}"
pyver="${PYTHON_VERSION:-3.12}"
arch="${PLATFORM:-x86_64}"

packages=(
  # DICOM decoding and its codecs
  pydicom pylibjpeg pylibjpeg-openjpeg pylibjpeg-rle python-gdcm
  # records: the TFDS builder, ArrayRecord, grain, and their requirements
  tensorflow-datasets array-record grain dm-tree immutabledict promise simple-parsing
  docstring-parser tensorflow-metadata googleapis-common-protos termcolor toml portpicker
  importlib-resources
  # training
  clu ml-collections tensorboard threadpoolctl pyyaml six wrapt etils absl-py protobuf psutil tqdm
  requests cloudpickle pyarrow packaging typing-extensions
  # serving
  starlette uvicorn python-multipart anyio h11 sniffio idna click
)

have=" "
if [[ -n "$host" ]]; then
  # Normalised names (PEP 503): lower case, runs of -_. as one -.
  have+="$(sed -e 's/[=<> ;@].*//' -e '/^#/d' "$host" | tr 'A-Z_.' 'a-z--' | tr '\n' ' ')"
fi

platforms=()
for tag in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 \
  manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_${arch}")
done

mkdir -p "$dir"
fetched=0
for name in "${packages[@]}"; do
  if [[ "$have" == *" $name "* ]]; then
    continue
  fi
  if ! "$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" \
    --implementation cp "${platforms[@]}" -d "$dir" "$name" 2>/dev/null; then
    # Published as source only: pure-Python ones build into a py3-none-any wheel here.
    "$python" -m pip wheel -q --no-deps -w "$dir" "$name"
    if ! ls "$dir" | grep -qi "^${name//-/_}-.*-none-any\.whl$"; then
      echo "$0: no wheel of $name for Python $pyver on $arch" >&2
      exit 1
    fi
  fi
  fetched=$((fetched + 1))
done
echo "$fetched packages in $dir ($(du -sh "$dir" | cut -f1)); skipped as on the host:" \
  "$(( ${#packages[@]} - fetched ))"
