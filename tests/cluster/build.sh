#!/usr/bin/env bash
# Builds the upstream binaries of the local control plane from their published
# Go modules (pinned in versions.env and tools/*/go.mod) into a cache outside
# the repository: ${MLPLANE_BIN_CACHE:-~/.cache/mlplane/bin}/<version>/.
# A binary already in the cache is not rebuilt. Prints the bin directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
cache=${MLPLANE_BIN_CACHE:-$HOME/.cache/mlplane/bin}
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false

log() { echo "build.sh: $*" >&2; }

# build <module dir> <output> <package> [ldflags]
build() {
  local dir=$1 out=$2 pkg=$3 ldflags=${4:-}
  if [[ -x $out ]]; then return 0; fi
  mkdir -p "$(dirname "$out")"
  log "building $(basename "$out") ($pkg)"
  local start=$SECONDS
  (cd "$here/tools/$dir" && go build -trimpath -ldflags "-s -w $ldflags" -o "$out.tmp" "$pkg")
  mv "$out.tmp" "$out"
  log "built $(basename "$out") in $((SECONDS - start))s"
}

kube_minor=${KUBE_VERSION#v1.}; kube_minor=${kube_minor%%.*}
build_date=2026-01-01T00:00:00Z
kube_ldflags=""
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  kube_ldflags+=" -X $p.gitVersion=$KUBE_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$kube_minor"
  kube_ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=$build_date"
done

kdir=$cache/kubernetes-$KUBE_VERSION
for c in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  build kubernetes "$kdir/$c" "k8s.io/kubernetes/cmd/$c" "$kube_ldflags"
done
build etcd "$cache/etcd-$ETCD_VERSION/etcd" go.etcd.io/etcd/server/v3
kwok_ldflags="-X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION -X sigs.k8s.io/kwok/pkg/consts.KubeVersion=$KUBE_VERSION"
for c in kwok kwokctl; do
  build kwok "$cache/kwok-$KWOK_VERSION/$c" "sigs.k8s.io/kwok/cmd/$c" "$kwok_ldflags"
done
# As helm's Makefile does: the default Kubernetes version of `helm template`
# and lint comes from the client-go it is built with (v0.Y.Z -> 1.Y).
client_go=$(cd "$here/tools/helm" && go list -f '{{.Version}}' -m k8s.io/client-go)
cg_minor=$(echo "$client_go" | cut -d. -f2)
helm_ldflags="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for p in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  helm_ldflags+=" -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$cg_minor"
done
build helm "$cache/helm-$HELM_VERSION/helm" helm.sh/helm/v3/cmd/helm "$helm_ldflags"

# The Cluster API CRDs the clusterAPI provider's tests install.
"$here/cluster-api-crds.sh" >/dev/null
# MinIO for the object-store tests. Its release metadata (what `minio
# --version` and the server's headers say) as MinIO's own build sets it,
# derived from the pseudo-version: v0.0.0-<yyyymmddhhmmss>-<commit>.
minio_ts=$(echo "$MINIO_VERSION" | cut -d- -f2)
minio_commit=$(echo "$MINIO_VERSION" | cut -d- -f3)
minio_date="${minio_ts:0:4}-${minio_ts:4:2}-${minio_ts:6:2}T${minio_ts:8:2}:${minio_ts:10:2}:${minio_ts:12:2}Z"
minio_ldflags=""
for kv in "Version=$minio_date" "ReleaseTag=RELEASE.${minio_date//:/-}" "CommitID=$minio_commit" \
          "ShortCommitID=$minio_commit" "CopyrightYear=${minio_ts:0:4}"; do
  minio_ldflags+=" -X github.com/minio/minio/cmd.$kv"
done
build minio "$cache/minio-$MINIO_VERSION/minio" github.com/minio/minio "$minio_ldflags"
# Gateway API CRDs for the ModelDeployment tests (fetched, not built).
"$here/gateway-api.sh" >/dev/null

# One directory of links, so callers put a single entry on PATH.
bin=$cache/current
mkdir -p "$bin"
for f in "$kdir"/* "$cache/etcd-$ETCD_VERSION/etcd" "$cache/kwok-$KWOK_VERSION"/* "$cache/helm-$HELM_VERSION/helm" \
         "$cache/minio-$MINIO_VERSION/minio"; do
  ln -sfn "$f" "$bin/$(basename "$f")"
done
echo "$bin"
