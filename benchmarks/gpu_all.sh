#!/usr/bin/env bash
# Every GPU measurement of issues 5, 19 and 20, ready for a lent machine (nvidia-h100-x1 or nvidia-h200).
#
# Once, here (the machine with internet access to the package index):
#   bash benchmarks/gpu_all.sh prepare
# puts the wheels the GPU image lacks into .whl/ and BloodMNIST into .carry/ (both git-excluded).
# Then two device calls, each inside the 10-minute limit of one command (compiling nine backbones
# twice, for training and inference, needs a call of its own):
#   run(command="bash benchmarks/gpu_all.sh all $OUT",      carry=[".whl", ".carry"])   # speed (eager) + train
#   run(command="bash benchmarks/gpu_all.sh compiled $OUT", carry=[".whl", ".carry"])
#   run(command="bash benchmarks/gpu_all.sh medmnist $OUT", carry=[".whl", ".carry"])  # issue 19: 224 px, 3 seeds
#   run(command="bash benchmarks/gpu_all.sh features $OUT", carry=[".whl", ".whl-wsi", ".carry-wsi"])  # issue 20
# (the carry limit is 64 MiB a call: the slide stage has its own wheels and data, without BloodMNIST)
# or the stages one by one: speed | compiled | train | medmnist | features.
# Each leaves its CSV/Markdown/PNG files and a log in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
stage="${1:?stage: prepare | all | speed | compiled | train | medmnist | features}"
out="${2:-gpu-results}"
B=resnet18,resnet50,efficientnet_b0,tf_efficientnet_lite0,convnext_tiny,regnety_016,mobilenetv3_large_100,densenet121,efficientnet_b3

if [ "$stage" = prepare ]; then
  mkdir -p .git/info .whl .whl-wsi .carry .carry-wsi
  for d in /.whl/ /.whl-wsi/ /.carry/ /.carry-wsi/ /.carry-shared/; do grep -qx "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
  shared="${MEDVISION_SHARED:-../shared}"
  cp "$shared/data/bloodmnist.npz" "$shared/data/breastmnist.npz" "$shared/weights/tf_efficientnet_lite0.in1k.safetensors" .carry/
  cp -r "$shared/data/he_tiles" .carry-wsi/  # the real H&E tiles the features stage builds its slides from
  # the GPU image has torch, timm, numpy, opencv, scipy, PyYAML, safetensors, matplotlib, tifffile, tqdm;
  # these it lacks (python 3.12 there):
  wheels() {  # wheels for the image's python 3.12 into folder $1
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$@"
  }
  wheels .whl albumentations==2.0.8 albucore==0.0.24 simsimd stringzilla pydantic==2.14.3 pydantic-core==2.50.4 \
    annotated-types typing-inspection pydicom pebble
  # and what the slide readers need besides (the features stage only; the image has h5py, scikit-learn, joblib and
  # threadpoolctl: carrying them too put a call within 1 MiB of its 64 MiB)
  wheels .whl-wsi imagecodecs openslide-python openslide-bin pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg \
    pylibjpeg-rle
  du -sh .whl .whl-wsi .carry .carry-wsi
  exit 0
fi

mkdir -p "$out"
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1 MEDVISION_SHARED="$PWD/.carry-shared"
mkdir -p .carry-shared/data .carry-shared/weights
ln -sf "$PWD/.carry/bloodmnist.npz" .carry-shared/data/bloodmnist.npz
[ -f .carry/breastmnist.npz ] && ln -sf "$PWD/.carry/breastmnist.npz" .carry-shared/data/breastmnist.npz
ln -sf "$PWD/.carry/tf_efficientnet_lite0.in1k.safetensors" .carry-shared/weights/
if [ -d .carry-wsi/he_tiles ]; then ln -sfn "$PWD/.carry-wsi/he_tiles" .carry-shared/data/he_tiles; fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  $(ls .whl-wsi/*.whl 2>/dev/null)
export PYTHONPATH="$PWD:/tmp/site"
mv_results() { for f in "$1"/*; do command cp "$f" "$out/$2-$(basename "$f")"; done; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"; } | tee "$out/machine.txt"

if [ "$stage" = all ]; then
  bash "$0" speed "$out" && bash "$0" train "$out"
  exit
fi

case "$stage" in
  speed)
    python3 -m medvision.cli benchmark speed --backbones $B --image-size 224 --batch-size 256 --amp bf16 \
      --channels-last --out /tmp/eager 2>&1 | tee "$out/speed.log"
    mv_results /tmp/eager eager ;;
  compiled)
    python3 -m medvision.cli benchmark speed --backbones $B --image-size 224 --batch-size 256 --amp bf16 \
      --channels-last --compile --out /tmp/compiled 2>&1 | tee "$out/compiled.log"
    mv_results /tmp/compiled compiled ;;
  train)
    python3 benchmarks/train_overhead.py --model resnet50 --images 8192 --image-size 224 --batch-size 256 \
      --amp bf16 --out "$out/train_overhead.csv" 2>&1 | tee "$out/train.log"
    python3 -m medvision.cli train recipes/bloodmnist_effnet_lite0.yaml --set data.image_size=224 \
      --set data.num_workers=12 --set name=bloodmnist_224 --set output_dir=/tmp/runs 2>&1 | tee -a "$out/train.log"
    cp /tmp/runs/bloodmnist_224/metrics.json "$out/bloodmnist_224_metrics.json"
    cp /tmp/runs/bloodmnist_224/report.html "$out/bloodmnist_224_report.html" ;;
  medmnist)
    # the shipped MedMNIST recipes at 224 px (the 28 px files upsampled), 3 seeds each, beside the published rows
    for r in bloodmnist_effnet_lite0 breastmnist_effnet_lite0_gray breastmnist_resnet18_scratch; do
      python3 -m medvision.cli benchmark medmnist "recipes/$r.yaml" --seeds 0,1,2 --set data.image_size=224 \
        --set data.num_workers=12 --out "/tmp/medmnist-$r" 2>&1 | tee -a "$out/medmnist.log"
      for f in medmnist.md medmnist.csv medmnist_summary.csv; do cp "/tmp/medmnist-$r/$f" "$out/$r-224-$f"; done
    done ;;
  features)
    # issue 20: `medvision features` against the encoder alone on the same batches, both on the GPU, the tiles read
    # by features' default readers (every core but one); the fast CNN and UNI's ViT-L/16 (random weights: the real
    # ones are gated), bf16; 3 SVS slides of 24576 x 18432 px, each run 8 times under other names (24 slides,
    # about 21,000 tiles: a steady rate, not the pools' start). The lite0 ImageNet file is not carried (64 MiB a
    # call): its architecture with random weights, the same compute. (The runs of 2026-12-04 and what they
    # showed: benchmarks/RESULTS.md, "Feature extraction on an H200".)
    # First the machine's /dev/shm (a container's may be 64 MB: the slots are memory files now, not files there)
    # and the hand-off alone beside a consumer that holds the GIL as the model's launches do (one minute).
    { df -h /dev/shm; nproc; } 2>&1 | tee "$out/features.log"
    python3 benchmarks/tile_handoff.py --only consumer --rounds 1 --workers 4 15 --csv "$out/tile_handoff.csv" 2>&1 \
      | tee -a "$out/features.log"
    python3 benchmarks/feature_throughput.py --slides 3 --size 24576 18432 --copies 8 \
      --encoders timm:tf_efficientnet_lite0,uni --max-tiles 0 0 --amp auto --ways auto:on --rounds 3 \
      --csv "$out/feature_throughput.csv" 2>&1 | tee -a "$out/features.log" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
