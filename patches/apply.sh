#!/usr/bin/env bash
# Apply (or check / revert) the SPAttention band-backend patch to an OLMo-core 3.0.0 source tree.
#
# Usage: patches/apply.sh [--check] [--reverse] OLMO_CORE_TREE
#
# OLMO_CORE_TREE may be any of:
#   - an OLMo-core git checkout (holds src/olmo_core/)                 -> patch -p1
#   - a directory holding an olmo_core/ package (e.g. site-packages)   -> patch -p2
#   - the olmo_core package directory itself                           -> patch -p3
#
#   --check    only test whether the patch applies cleanly; change nothing
#   --reverse  remove a previously applied patch
#
# Uses GNU patch (--fuzz=0), or `git apply` when patch is missing; PATCH_TOOL=patch|git picks.
# Exit status: 0 on success (or when the patch is already applied), 1 when it does not apply,
# 2 on bad usage.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PATCH_FILE="${PATCH_FILE:-$HERE/olmo-core-3.0.0-band-attention.patch}"
EXPECTED_VERSION="3.0.0"

usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "${BASH_SOURCE[0]}"; }
die() { echo "apply.sh: error: $*" >&2; exit 2; }

check=0
reverse=0
tree=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --check) check=1 ;;
    --reverse) reverse=1 ;;
    -*) die "unknown option '$1' (allowed: --check, --reverse, --help)" ;;
    *) [[ -z "$tree" ]] || die "only one OLMo-core tree may be given (got '$tree' and '$1')"; tree="$1" ;;
  esac
  shift
done
[[ -n "$tree" ]] || { usage >&2; die "missing OLMO_CORE_TREE"; }
[[ -d "$tree" ]] || die "'$tree' is not a directory"
[[ -f "$PATCH_FILE" ]] || die "patch file '$PATCH_FILE' not found"
tool="${PATCH_TOOL:-}"
if [[ -z "$tool" ]]; then
  if command -v patch >/dev/null 2>&1; then tool=patch
  elif command -v git >/dev/null 2>&1; then tool=git
  else die "neither 'patch' nor 'git' is installed (apt-get install patch)"
  fi
fi
[[ "$tool" == patch || "$tool" == git ]] || die "PATCH_TOOL must be 'patch' or 'git', got '$tool'"
command -v "$tool" >/dev/null 2>&1 || die "PATCH_TOOL=$tool but '$tool' is not installed"

if [[ -f "$tree/src/olmo_core/nn/attention/backend.py" ]]; then
  strip=1; pkg="$tree/src/olmo_core"
elif [[ -f "$tree/olmo_core/nn/attention/backend.py" ]]; then
  strip=2; pkg="$tree/olmo_core"
elif [[ -f "$tree/nn/attention/backend.py" && -f "$tree/version.py" ]]; then
  strip=3; pkg="$tree"
else
  die "'$tree' does not look like an OLMo-core tree (no src/olmo_core/, olmo_core/ or nn/attention/backend.py)"
fi

version="$(sed -n 's/^_\(MAJOR\|MINOR\|PATCH\) = "\(.*\)"/\2/p' "$pkg/version.py" 2>/dev/null | paste -sd. -)"
if [[ "$version" != "$EXPECTED_VERSION" ]]; then
  echo "apply.sh: warning: OLMo-core version is '${version:-unknown}', the patch was made for $EXPECTED_VERSION" >&2
fi

tree_abs="$(cd "$tree" && pwd)"
# patch_cmd forward|reverse check|apply: the command line (never fuzzy: the patch is pinned to one
# OLMo-core version and must not land on code it was not made for).
patch_cmd() {
  if [[ "$tool" == patch ]]; then
    cmd=(patch -d "$tree_abs" -p"$strip" --batch --silent --fuzz=0)
    if [[ "$1" == reverse ]]; then cmd+=(-R); else cmd+=(--forward); fi
    if [[ "$2" == check ]]; then cmd+=(--dry-run); fi
    cmd+=(-i "$PATCH_FILE")
  else
    cmd=(git -C "$tree_abs" apply -p"$strip")
    if [[ "$1" == reverse ]]; then cmd+=(-R); fi
    if [[ "$2" == check ]]; then cmd+=(--check); fi
    cmd+=("$PATCH_FILE")
  fi
}
run() {
  patch_cmd "$1" "$2"
  # keep git from treating an enclosing repository as the root of the paths
  GIT_CEILING_DIRECTORIES="$(dirname "$tree_abs")" "${cmd[@]}"
}
show() { patch_cmd "$1" apply; printf -v line ' %q' "${cmd[@]}"; echo "+${line}"; }

if [[ $reverse -eq 1 ]]; then
  if ! run reverse check >/dev/null 2>&1; then
    echo "apply.sh: the patch is not applied to $pkg (nothing to revert)" >&2
    exit 1
  fi
  [[ $check -eq 1 ]] && { echo "patch can be reverted in $pkg"; exit 0; }
  show reverse
  run reverse apply
  echo "reverted the band attention patch in $pkg"
  exit 0
fi

if run forward check >/dev/null 2>&1; then
  [[ $check -eq 1 ]] && { echo "patch applies cleanly to $pkg"; exit 0; }
  show forward
  run forward apply
  echo "applied the band attention patch to $pkg (AttentionBackendName.band, olmo_core/nn/attention/band.py)"
  exit 0
fi
if run reverse check >/dev/null 2>&1; then
  echo "the band attention patch is already applied to $pkg"
  exit 0
fi
echo "apply.sh: the patch does not apply cleanly to $pkg; details:" >&2
run forward check >&2 || true
exit 1
