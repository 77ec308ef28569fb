# Shared helpers for the launch scripts (sourced, not run). Bash only.
# shellcheck shell=bash

OLMOE_SPATTN_ROOT="${OLMOE_SPATTN_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
PYTHON="${PYTHON:-python}"

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}

# require_uint NAME VALUE [MIN]: VALUE must be a whole number >= MIN (default 0).
require_uint() {
  local name="$1" value="$2" min="${3:-0}"
  [[ "$value" =~ ^[0-9]+$ ]] || die "$name must be a whole number, got '$value'"
  (( 10#$value >= min )) || die "$name must be >= $min, got '$value'"
}

# require_port NAME VALUE: a TCP port 1..65535.
require_port() {
  require_uint "$1" "$2" 1
  (( 10#$2 <= 65535 )) || die "$1 must be a TCP port (1-65535), got '$2'"
}

# resolve_config CONFIG: prints the recipe path; a bundled name such as 'tiny' means configs/tiny.yaml.
resolve_config() {
  local cfg="$1"
  [[ -n "$cfg" ]] || die "missing CONFIG (a recipe YAML file, e.g. configs/tiny.yaml)"
  if [[ -f "$cfg" ]]; then
    echo "$cfg"
    return
  fi
  [[ -e "$cfg" ]] && die "config '$cfg' is not a regular file"
  local base="${cfg##*/}"
  [[ "$base" == *.yaml || "$base" == *.yml ]] || base="$base.yaml"
  if [[ "$cfg" != */* && -f "$OLMOE_SPATTN_ROOT/configs/$base" ]]; then
    echo "$OLMOE_SPATTN_ROOT/configs/$base"
    return
  fi
  local available
  available="$(cd "$OLMOE_SPATTN_ROOT/configs" 2>/dev/null && ls -1 ./*.yaml 2>/dev/null | sed 's|^\./||; s|\.yaml$||' | paste -sd, - | sed 's/,/, /g')"
  die "config file '$cfg' not found (bundled recipes: ${available:-none})"
}

# default_nproc: number of visible GPUs, or 1 without any.
default_nproc() {
  local n=0
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    n="$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    n="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')" || n=0
  fi
  (( n > 0 )) || n=1
  echo "$n"
}

# run_cmd CMD...: prints the exact command (shell-quoted); runs it unless DRY_RUN=1.
run_cmd() {
  local quoted
  printf -v quoted ' %q' "$@"
  echo "+${quoted}"
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    return 0
  fi
  exec "$@"
}

check_dry_run_var() {
  [[ "${DRY_RUN:-0}" =~ ^[01]$ ]] || die "DRY_RUN must be 0 or 1, got '${DRY_RUN}'"
}

# print_usage FILE: the comment block at the top of FILE (after the #! line), without '# '.
print_usage() {
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$1"
}

# parse_launcher_args SCRIPT ARGS...: handles the launcher options (--help, --dry-run, --)
# before CONFIG; sets CONFIG (resolved path) and the array TRAIN_ARGS (everything after it).
parse_launcher_args() {
  local script="$1"
  shift
  while [[ $# -gt 0 ]]; do
    case "$1" in
      -h|--help) print_usage "$script"; exit 0 ;;
      --dry-run) DRY_RUN=1; shift ;;
      --) shift; break ;;
      -*) die "unknown launcher option '$1' (launcher options: --dry-run, --help; train options go after CONFIG)" ;;
      *) break ;;
    esac
  done
  [[ $# -ge 1 ]] || { print_usage "$script" >&2; die "missing CONFIG"; }
  check_dry_run_var
  CONFIG="$(resolve_config "$1")"
  shift
  TRAIN_ARGS=("$@")
}
