#!/usr/bin/env bash
# Download the weights and prompt files Reward Forcing needs, in the layout its configs expect
# (checkpoint_dir = checkpoints/ by default). Re-running resumes partial downloads and skips
# parts already present. Needs the huggingface_hub CLI `hf` (pip install "huggingface_hub>=0.34")
# and curl (for the benchmark prompt files and TAEHV, which live on GitHub).
set -euo pipefail

# Pinned revisions (override with the environment variable of the same name; "main" = newest).
: "${WAN_1_3B_REVISION:=37ec512624d61f7aa208f7ea8140a131f93afc9a}"  # third-party manifest revision
: "${VIDEOREWARD_REVISION:=b8e421fe21aec3dde5f61fdd1dc44e1d603b9727}"
: "${QWEN2_VL_REVISION:=895c3a49bc3fa70a340399125c650a463535e71c}"
: "${SELF_FORCING_COMMIT:=33593df3e81fa3ec10239271dd2c100facac6de1}"  # GitHub guandeh17/Self-Forcing
: "${TAEHV_COMMIT:=main}"                                              # GitHub madebyollin/taehv
: "${VIDEOALIGN_COMMIT:=219ab9db64c045e5181a2202d11f686439351292}"    # GitHub KwaiVGI/VideoAlign
: "${IMAGEREWARD_REVISION:=main}"                                     # Hugging Face THUDM/ImageReward
: "${BERT_REVISION:=main}"                                            # Hugging Face google-bert/bert-base-uncased

DEFAULT_PARTS=(wan-1.3b videoreward videoalign-template qwen2-vl ode-init reward-forcing train-prompts bench-prompts)
OPTIONAL_PARTS=(wan-14b taehv imagereward causal-forcing)

usage() {
  cat <<EOF
Usage: bash download_checkpoints.sh [options]

Downloads into CHECKPOINT_DIR (default: checkpoints) and PROMPT_DIR (default: prompts):
  wan-1.3b        Wan-AI/Wan2.1-T2V-1.3B           -> CHECKPOINT_DIR/Wan2.1-T2V-1.3B/ (DiT, T5, VAE, tokenizer)
  videoreward     KlingTeam/VideoReward            -> CHECKPOINT_DIR/VideoReward/
  videoalign-template GitHub KwaiVGI/VideoAlign    -> CHECKPOINT_DIR/VideoReward/prompt_template.py (rubric text;
                                                      the reward loader checks its sha256)
  qwen2-vl        Qwen/Qwen2-VL-2B-Instruct        -> CHECKPOINT_DIR/Qwen2-VL-2B-Instruct/ (config, tokenizer,
                                                      processor files only; VideoReward holds the weights)
  ode-init        gdhe17/Self-Forcing              -> CHECKPOINT_DIR/ode_init.pt
  reward-forcing  JaydenLu666/Reward-Forcing-T2V-1.3B -> CHECKPOINT_DIR/Reward-Forcing-T2V-1.3B/rewardforcing.pt
  train-prompts   gdhe17/Self-Forcing              -> PROMPT_DIR/vidprom_filtered_extended.txt
  bench-prompts   GitHub guandeh17/Self-Forcing    -> PROMPT_DIR/MovieGenVideoBench{,_extended}.txt,
                                                      PROMPT_DIR/vbench/all_dimension{,_extended}.txt (sha256-checked)
Optional parts:
  wan-14b         Wan-AI/Wan2.1-T2V-14B            -> CHECKPOINT_DIR/Wan2.1-T2V-14B/ (teacher DiT only, ~57 GB)
  taehv           GitHub madebyollin/taehv         -> CHECKPOINT_DIR/taew2_1.pth (fast preview decoder)
  imagereward     THUDM/ImageReward + google-bert/bert-base-uncased
                                                   -> CHECKPOINT_DIR/ImageReward/{ImageReward.pt, med_config.json,
                                                      bert-base-uncased/} (reward of trainer: reward_feedback)
  causal-forcing  zhuhz22/Causal-Forcing           -> CHECKPOINT_DIR/chunkwise/{ar_diffusion.pt, causal_ode.pt}
                                                      (Causal Forcing's autoregressive teacher and causal ODE init,
                                                      arXiv 2602.02214; configs/causal_forcing_*.yaml)

Options:
  --checkpoint-dir DIR  where weights go (default: checkpoints; pass checkpoint_dir=DIR to the CLIs to match)
  --prompt-dir DIR      where prompt files go (default: prompts)
  --with-teacher        also download wan-14b (needed for training only)
  --with-taehv          also download taehv
  --with-imagereward    also download imagereward
  --only NAME[,NAME]    download only these parts (repeatable; optional parts allowed)
  --no-verify           skip sha256 checks
  --list                print the part names and exit
  -h, --help            show this help and exit

Environment: WAN_1_3B_REVISION, VIDEOREWARD_REVISION, QWEN2_VL_REVISION, SELF_FORCING_COMMIT, TAEHV_COMMIT,
VIDEOALIGN_COMMIT,
IMAGEREWARD_REVISION, BERT_REVISION override the pinned revisions; HF_TOKEN is passed on to hf.
EOF
}

say() { echo "[download] $*"; }
die() { echo "error: $*" >&2; exit 1; }
usage_error() { echo "error: $*" >&2; exit 2; }

contains() {
  local needle=$1; shift
  local item
  for item in "$@"; do [[ "$item" == "$needle" ]] && return 0; done
  return 1
}

# --- arguments ---
CHECKPOINT_DIR=checkpoints
PROMPT_DIR=prompts
WITH_TEACHER=0
WITH_TAEHV=0
WITH_IMAGEREWARD=0
VERIFY=1
ONLY=()

need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || usage_error "option $1 needs a value (see --help)"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --list) printf '%s\n' "${DEFAULT_PARTS[@]}" "${OPTIONAL_PARTS[@]}"; exit 0 ;;
    --checkpoint-dir) need_value "$@"; CHECKPOINT_DIR=$2; shift 2 ;;
    --prompt-dir) need_value "$@"; PROMPT_DIR=$2; shift 2 ;;
    --with-teacher) WITH_TEACHER=1; shift ;;
    --with-taehv) WITH_TAEHV=1; shift ;;
    --with-imagereward) WITH_IMAGEREWARD=1; shift ;;
    --no-verify) VERIFY=0; shift ;;
    --only)
      need_value "$@"
      IFS=',' read -r -a names <<< "$2"
      for name in "${names[@]}"; do
        contains "$name" "${DEFAULT_PARTS[@]}" "${OPTIONAL_PARTS[@]}" \
          || usage_error "unknown part '$name' for --only; choose from: ${DEFAULT_PARTS[*]} ${OPTIONAL_PARTS[*]}"
        ONLY+=("$name")
      done
      shift 2 ;;
    *) usage_error "unknown argument '$1' (see --help)" ;;
  esac
done

if [[ ${#ONLY[@]} -gt 0 ]]; then
  PARTS=("${ONLY[@]}")
else
  PARTS=("${DEFAULT_PARTS[@]}")
  [[ $WITH_TEACHER == 1 ]] && PARTS+=(wan-14b)
  [[ $WITH_TAEHV == 1 ]] && PARTS+=(taehv)
  [[ $WITH_IMAGEREWARD == 1 ]] && PARTS+=(imagereward)
fi

STAGING="$CHECKPOINT_DIR/.downloads"

# --- helpers ---
require_tool() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' not found on PATH: $2"
}

# all_present DIR FILE...: every FILE exists under DIR (hf writes a file only once it is complete).
all_present() {
  local dir=$1; shift
  local file
  for file in "$@"; do [[ -f "$dir/$file" ]] || return 1; done
  return 0
}

# check_hub: one quick request to the Hub before the first hf download, so that an unreachable Hub is one
# line at once (hf itself retries each file five times, then prints an unrelated hint).
HUB_CHECKED=0
check_hub() {
  [[ $HUB_CHECKED == 1 ]] && return 0
  local endpoint=${HF_ENDPOINT:-https://huggingface.co}
  if command -v curl >/dev/null 2>&1; then
    curl --silent --head --max-time 20 --output /dev/null "$endpoint" \
      || die "cannot reach $endpoint (offline, or a proxy blocks it?); nothing more was downloaded"
  fi
  HUB_CHECKED=1
}

# first_missing DIR: the outermost folder of DIR that does not exist yet ('' when DIR exists).
first_missing() {
  local dir=$1 missing=""
  while [[ -n "$dir" && "$dir" != "." && "$dir" != "/" && ! -e "$dir" ]]; do missing=$dir; dir=$(dirname "$dir"); done
  echo "$missing"
}

# remove_if_no_data DIR: delete DIR when it holds nothing resumable (only hf's empty bookkeeping).
remove_if_no_data() {
  local dir=$1
  [[ -n "$dir" && -d "$dir" ]] || return 0
  [[ -z "$(find "$dir" -type f -size +0c ! -name .gitignore ! -name CACHEDIR.TAG ! -name '*.lock' -print -quit)" ]] \
    && rm -rf "$dir"
  return 0
}

# hf_get REPO REVISION DIR [FILES or --include PATTERN ...]: resumable download into DIR; a failed first
# attempt removes the folders it created unless they hold partial data to resume.
hf_get() {
  local repo=$1 revision=$2 dir=$3 created; shift 3
  require_tool hf 'install the huggingface_hub CLI: pip install "huggingface_hub>=0.34"'
  check_hub
  created=$(first_missing "$dir")
  mkdir -p "$dir"
  say "hf download $repo (revision $revision) -> $dir"
  if ! hf download "$repo" "$@" --revision "$revision" --local-dir "$dir"; then
    remove_if_no_data "$created"
    die "hf download $repo failed; re-run this script to resume"
  fi
}

sha256_of() {
  if command -v sha256sum >/dev/null 2>&1; then sha256sum "$1" | cut -d' ' -f1; else shasum -a 256 "$1" | cut -d' ' -f1; fi
}

# check_sha256 FILE EXPECTED: a wrong file is moved aside so that a re-run fetches it again.
check_sha256() {
  local file=$1 expected=$2 actual
  [[ $VERIFY == 1 && -n "$expected" ]] || return 0
  actual=$(sha256_of "$file")
  if [[ "$actual" != "$expected" ]]; then
    mv -f "$file" "$file.bad"
    die "sha256 mismatch for $file (expected $expected, got $actual); moved to $file.bad, re-run to fetch it again or pass --no-verify"
  fi
}

# warn_sha256 FILE EXPECTED: for checksums known only from third parties; hf has already checked the
# transfer against the Hub's own hash, so a difference questions the published value, not the file.
warn_sha256() {
  local file=$1 expected=$2 actual
  [[ $VERIFY == 1 ]] || return 0
  actual=$(sha256_of "$file")
  [[ "$actual" == "$expected" ]] \
    || echo "warning: sha256 of $file is $actual, not the third-party value $expected; please report it" >&2
  return 0
}

# url_get URL DEST SHA256: resumable curl download, checked, then moved into place.
url_get() {
  local url=$1 dest=$2 sha=$3
  if [[ -f "$dest" ]]; then
    check_sha256 "$dest" "$sha"
    say "present: $dest"
    return 0
  fi
  require_tool curl "install curl to fetch $url"
  mkdir -p "$(dirname "$dest")"
  say "curl $url -> $dest"
  curl --fail --location --retry 3 --continue-at - --output "$dest.part" "$url" \
    || die "download of $url failed; re-run this script to resume"
  mv -f "$dest.part" "$dest"
  check_sha256 "$dest" "$sha"
}

# from_staging REPO FILE DEST: fetch one file of a repo that also holds other things, then move it to DEST.
from_staging() {
  local repo=$1 file=$2 dest=$3
  if [[ -f "$dest" ]]; then say "present: $dest"; return 0; fi
  hf_get "$repo" main "$STAGING/${repo//\//--}" "$file"
  mkdir -p "$(dirname "$dest")"
  mv -f "$STAGING/${repo//\//--}/$file" "$dest"
}

# --- parts ---
part_wan-1.3b() {
  local dir="$CHECKPOINT_DIR/Wan2.1-T2V-1.3B"
  if all_present "$dir" config.json diffusion_pytorch_model.safetensors models_t5_umt5-xxl-enc-bf16.pth \
      Wan2.1_VAE.pth google/umt5-xxl/spiece.model google/umt5-xxl/tokenizer_config.json; then
    say "present: $dir"; return 0
  fi
  hf_get Wan-AI/Wan2.1-T2V-1.3B "$WAN_1_3B_REVISION" "$dir"
}

# The teacher's T5, VAE and tokenizer are never used (they always come from the 1.3B folder).
part_wan-14b() {
  local dir="$CHECKPOINT_DIR/Wan2.1-T2V-14B" index=diffusion_pytorch_model.safetensors.index.json
  if [[ -f "$dir/$index" ]]; then
    local shards
    shards=$(grep -o '"diffusion_pytorch_model-[^"]*\.safetensors"' "$dir/$index" | tr -d '"' | sort -u)
    # shellcheck disable=SC2086  # shard names have no spaces
    if all_present "$dir" config.json $shards; then say "present: $dir"; return 0; fi
  fi
  hf_get Wan-AI/Wan2.1-T2V-14B main "$dir" --include config.json --include 'diffusion_pytorch_model*'
}

part_videoreward() {
  local dir="$CHECKPOINT_DIR/VideoReward"
  if [[ -f "$dir/model_config.json" ]] && compgen -G "$dir/checkpoint-*/model.pth" >/dev/null; then
    say "present: $dir"; return 0
  fi
  hf_get KlingTeam/VideoReward "$VIDEOREWARD_REVISION" "$dir"
  if [[ -f "$dir/checkpoint-11352/model.pth" ]]; then  # the step of the pinned revision
    warn_sha256 "$dir/checkpoint-11352/model.pth" 48375908e6112de9f0248402db156a23b480709a6960b091c598c6f4c88d21b9
  fi
}

part_qwen2-vl() {
  local dir="$CHECKPOINT_DIR/Qwen2-VL-2B-Instruct"
  local files=(config.json generation_config.json preprocessor_config.json chat_template.json
               tokenizer.json tokenizer_config.json vocab.json merges.txt)
  if all_present "$dir" config.json preprocessor_config.json tokenizer.json tokenizer_config.json; then
    say "present: $dir"; return 0
  fi
  # Named files only: the base weights come merged inside VideoReward's model.pth.
  hf_get Qwen/Qwen2-VL-2B-Instruct "$QWEN2_VL_REVISION" "$dir" "${files[@]}"
}

part_ode-init() {
  from_staging gdhe17/Self-Forcing checkpoints/ode_init.pt "$CHECKPOINT_DIR/ode_init.pt"
}

part_reward-forcing() {
  local dir="$CHECKPOINT_DIR/Reward-Forcing-T2V-1.3B"
  if all_present "$dir" rewardforcing.pt; then say "present: $dir"; return 0; fi
  hf_get JaydenLu666/Reward-Forcing-T2V-1.3B main "$dir"
}

part_train-prompts() {
  from_staging gdhe17/Self-Forcing vidprom_filtered_extended.txt "$PROMPT_DIR/vidprom_filtered_extended.txt"
}

# sha256 of Self-Forcing's prompt files at the pinned commit; the files are not part of this repository.
part_bench-prompts() {
  local base="https://raw.githubusercontent.com/guandeh17/Self-Forcing/$SELF_FORCING_COMMIT/prompts"
  url_get "$base/MovieGenVideoBench.txt" "$PROMPT_DIR/MovieGenVideoBench.txt" \
    ae02a4bbebcb55067dbeea369e43d52a4817d57fd0ac223071b9aa236ac027c4
  url_get "$base/MovieGenVideoBench_extended.txt" "$PROMPT_DIR/MovieGenVideoBench_extended.txt" \
    50293c2717c8f2df5773154d4680c74e636ecb08eb4fe13cdce7357d0ab9d121
  url_get "$base/vbench/all_dimension.txt" "$PROMPT_DIR/vbench/all_dimension.txt" \
    f9b50654f81ab732b9235d5bb91f0c3a4d152fac19249ce3a3a9185b2d80d8c3
  url_get "$base/vbench/all_dimension_extended.txt" "$PROMPT_DIR/vbench/all_dimension_extended.txt" \
    c78f1ad32974503efaa8cc935347ace88f3a8b571adde6687bc8425bbf417cf3
}

part_taehv() {
  url_get "https://github.com/madebyollin/taehv/raw/$TAEHV_COMMIT/taew2_1.pth" "$CHECKPOINT_DIR/taew2_1.pth" ""
}

# ImageReward (arXiv 2304.05977): the checkpoint and its text-encoder config, then the tokenizer its code
# loads by hub id (bert-base-uncased) into the subfolder the loader reads.
part_imagereward() {
  local dir="$CHECKPOINT_DIR/ImageReward"
  if all_present "$dir" ImageReward.pt med_config.json; then
    say "present: $dir/ImageReward.pt"
  else
    hf_get THUDM/ImageReward "$IMAGEREWARD_REVISION" "$dir" ImageReward.pt med_config.json
  fi
  if all_present "$dir/bert-base-uncased" vocab.txt tokenizer_config.json; then
    say "present: $dir/bert-base-uncased"; return 0
  fi
  hf_get google-bert/bert-base-uncased "$BERT_REVISION" "$dir/bert-base-uncased" \
    vocab.txt tokenizer.json tokenizer_config.json
}

# Causal Forcing's released chunk-wise stage-1 and stage-2 weights, at the paths its README downloads them to
# (`hf download zhuhz22/Causal-Forcing chunkwise/... --local-dir checkpoints`).
part_causal-forcing() {
  from_staging zhuhz22/Causal-Forcing chunkwise/ar_diffusion.pt "$CHECKPOINT_DIR/chunkwise/ar_diffusion.pt"
  from_staging zhuhz22/Causal-Forcing chunkwise/causal_ode.pt "$CHECKPOINT_DIR/chunkwise/causal_ode.pt"
}

# VideoAlign's rubric text is another project's, so it is fetched, not committed. The file as a whole has
# no published checksum; the reward loader verifies the sha256 of the template constant it reads from it.
part_videoalign-template() {
  url_get "https://raw.githubusercontent.com/KwaiVGI/VideoAlign/$VIDEOALIGN_COMMIT/prompt_template.py" \
    "$CHECKPOINT_DIR/VideoReward/prompt_template.py" ""
}

# --- run ---
say "checkpoint dir: $CHECKPOINT_DIR, prompt dir: $PROMPT_DIR, parts: ${PARTS[*]}"
for part in "${PARTS[@]}"; do
  "part_$part"
done
say "done."
