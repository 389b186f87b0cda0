#!/usr/bin/env bash
# `buf breaking` for the gRPC contract in proto/ (the FILE rules of proto/buf.yaml), run by `make lint`.
#
# What the working tree's proto/ is compared against:
#   - on a branch other than main: main (or origin/main where only the remote branch exists, as in a
#     CI clone of a pull request), the branch it will merge into;
#   - on main itself (CI's fresh clone of main, or a developer committing on main): the previous commit,
#     HEAD~1. Comparing main with itself would check nothing; HEAD~1 checks the latest commit's change
#     and any uncommitted edit on top of it;
#   - where HEAD~1 is missing (a shallow clone of depth 1, or the first commit): HEAD, which checks only
#     uncommitted edits, and says so.
# BUF_BREAKING_AGAINST=<git ref> overrides the choice (e.g. a release tag).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
BUF=${BUF:-tools/buf/node_modules/.bin/buf}

branch=$(git rev-parse --abbrev-ref HEAD)
if [[ -n "${BUF_BREAKING_AGAINST:-}" ]]; then
  against=$BUF_BREAKING_AGAINST
elif [[ "$branch" != "main" ]] && git rev-parse -q --verify main^{commit} >/dev/null; then
  against=main
elif [[ "$branch" != "main" ]] && git rev-parse -q --verify origin/main^{commit} >/dev/null; then
  against=origin/main
elif git rev-parse -q --verify HEAD~1^{commit} >/dev/null; then
  against=HEAD~1
else
  against=HEAD
  echo "buf breaking: no previous commit in this clone; checking uncommitted changes against HEAD only"
fi
commit=$(git rev-parse --verify "$against^{commit}")
# The contract may not exist yet at that commit (nothing to break then).
if ! git cat-file -e "$commit:proto/buf.yaml" 2>/dev/null; then
  echo "buf breaking: $against has no proto/buf.yaml; nothing to compare"
  exit 0
fi
"$BUF" breaking proto --against ".git#ref=$commit,subdir=proto"
echo "buf breaking: proto/ is compatible with $against (${commit:0:12})"
