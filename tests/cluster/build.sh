#!/usr/bin/env bash
# Build the cluster tier's test infrastructure once: kube-apiserver, kubectl and etcd from their
# Go modules (tests/cluster/tools/go.mod pins them), and the CRDs the manifests use (from the
# modules tools/crds.txt pins). Everything goes into a cache directory OUTSIDE the repository,
# keyed by the hash of those pins, so a second run (or a second clone) rebuilds nothing.
#
#   tests/cluster/build.sh          build if needed; print the cache directory on stdout
#
# CP_TOKEN_CLUSTER_CACHE overrides the cache root (default ~/.cache/cp-token-cluster).
# Test infrastructure only: no product code is ever built from Go.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
tools="$here/tools"
root="${CP_TOKEN_CLUSTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cp-token-cluster}"
key="$(cat "$tools/go.mod" "$tools/go.sum" "$tools/crds.txt" "$here/build.sh" | sha256sum | cut -c1-16)"
out="$root/$key"
if [ -x "$out/bin/kube-apiserver" ] && [ -x "$out/bin/kubectl" ] && [ -x "$out/bin/etcd" ] \
    && [ -f "$out/crds/.done" ]; then
  echo "$out"
  exit 0
fi
command -v go >/dev/null || { echo "build.sh: Go is not installed (the cluster tier needs go >= 1.26)" >&2; exit 1; }
start=$(date +%s)
echo "build.sh: building kube-apiserver, kubectl and etcd into $out (first time: several minutes)" >&2
mkdir -p "$out/bin.tmp" "$out/crds.tmp"
cd "$tools"
export GOFLAGS="-mod=mod"
go build -o "$out/bin.tmp/etcd" go.etcd.io/etcd/server/v3
go build -o "$out/bin.tmp/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
go build -o "$out/bin.tmp/kubectl" k8s.io/kubernetes/cmd/kubectl
# Outside any module, so the download touches neither go.mod nor go.sum (the cache key).
scratch="$(mktemp -d)"
grep -vE '^\s*(#|$)' "$tools/crds.txt" | while read -r mod dir glob; do
  src="$(cd "$scratch" && GOFLAGS= go mod download -json "$mod" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')"
  [ -n "$src" ] || { echo "build.sh: go mod download $mod gave no directory" >&2; exit 1; }
  found=0
  for f in "$src/$dir"/$glob; do
    [ -f "$f" ] || continue
    cp "$f" "$out/crds.tmp/"
    found=1
  done
  [ "$found" = 1 ] || { echo "build.sh: no $dir/$glob in $mod" >&2; exit 1; }
done
rmdir "$scratch"
chmod u+w "$out/crds.tmp"/*
rm -rf "$out/bin" "$out/crds"
mv "$out/bin.tmp" "$out/bin"
mv "$out/crds.tmp" "$out/crds"
touch "$out/crds/.done"
echo "build.sh: built in $(( $(date +%s) - start )) s" >&2
echo "$out"
