#!/usr/bin/env bash
# Builds the tether container images without pulling anything:
#   tether/base:bookworm   a Debian bookworm minbase root filesystem (debootstrap + docker import)
#   tether/etcd:latest     Debian's etcd-server (and etcdctl) on that base
#   tether/tether:latest   the release `tether` binary (+ curl for health checks) on that base
#
# Usage: deploy/images/build.sh [options]
#   --base IMAGE     build etcd and tether FROM IMAGE (e.g. debian:bookworm-slim, if your Docker can
#                    pull) instead of the debootstrap base
#   --rebuild        rebuild the debootstrap base even if tether/base:bookworm exists
#   --binary PATH    the tether binary (default: target/release/tether; built with
#                    `cargo build --release -p tether` when missing)
#   --mirror URL     Debian mirror for debootstrap and for apt inside the images (default: the one
#                    this machine's apt sources use for bookworm)
#   --tag TAG        tag for tether/etcd and tether/tether (default: latest)
#   --only LIST      comma separated subset of: base,etcd,tether,prometheus
#   --no-strip       keep the binary's debug line tables (default: strip them)
#   --with-prometheus  also build tether/prometheus (Debian's prometheus binary) for the compose
#                    profile `prometheus`
# Prints the build time of each image and the image sizes at the end.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

SUITE=bookworm
BASE_IMAGE=tether/base:$SUITE
BASE=""
REBUILD=0
BINARY=""
MIRROR=${TETHER_APT_MIRROR:-}
TAG=latest
ONLY=base,etcd,tether
STRIP=1

die() { echo "build.sh: $*" >&2; exit 1; }
log() { echo "=== build.sh: $*"; }

while (($#)); do
    case $1 in
        --base) BASE=${2:?}; shift 2 ;;
        --rebuild) REBUILD=1; shift ;;
        --binary) BINARY=${2:?}; shift 2 ;;
        --mirror) MIRROR=${2:?}; shift 2 ;;
        --tag) TAG=${2:?}; shift 2 ;;
        --only) ONLY=${2:?}; shift 2 ;;
        --no-strip) STRIP=0; shift ;;
        --with-prometheus) ONLY+=,prometheus; shift ;;
        -h|--help) sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
done
want() { [[ ",$ONLY," == *",$1,"* ]]; }

command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "cannot talk to the Docker daemon"
# The classic builder: no BuildKit frontend image to pull, and it reaches the network like `docker run`.
export DOCKER_BUILDKIT=0

SIZES=()
TIMES=()
timed() { # timed NAME CMD...: runs CMD, records its wall time
    local name=$1 t0=$SECONDS; shift
    "$@"
    TIMES+=("$(printf '  %-26s %5ss' "$name" $((SECONDS - t0)))")
}

# --- the apt mirror -------------------------------------------------------------------------------

# apt_uri SUITE: the first enabled `deb` source of this machine serving SUITE (deb822 and one-line).
apt_uri() {
    local suite=$1 f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        awk -v suite="$suite" 'BEGIN { RS = ""; FS = "\n" }
            {
                types = ""; uris = ""; suites = ""; enabled = "yes"
                for (i = 1; i <= NF; i++) {
                    line = $i
                    if (line ~ /^[ \t]*#/) continue
                    key = tolower(line); sub(/:.*/, "", key)
                    val = line; sub(/^[^:]*:[ \t]*/, "", val)
                    if (key == "types") types = val
                    else if (key == "uris") uris = val
                    else if (key == "suites") suites = val
                    else if (key == "enabled") enabled = tolower(val)
                }
                if (enabled == "no" || (" " types " ") !~ / deb /) next
                n = split(suites, s, /[ \t]+/)
                for (j = 1; j <= n; j++) if (s[j] == suite) { split(uris, u, /[ \t]+/); print u[1]; exit }
            }' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        awk -v suite="$suite" '$1 == "deb" {
                i = 2
                if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                if ($(i + 1) == suite) print $i
            }' "$f"
    done
}

detect_mirrors() {
    if [[ -z $MIRROR ]]; then
        MIRROR=$(apt_uri "$SUITE" | head -n1)
        [[ -n $MIRROR ]] || die "no apt source for '$SUITE' in /etc/apt; pass --mirror URL"
    fi
    MIRROR=${MIRROR%/}
    SECURITY_MIRROR=${TETHER_APT_SECURITY_MIRROR:-$(apt_uri "$SUITE-security" | head -n1)}
    SECURITY_MIRROR=${SECURITY_MIRROR%/}
    log "apt mirror: $MIRROR${SECURITY_MIRROR:+ (security: $SECURITY_MIRROR)}"
}

# The host's Acquire settings that apt inside the images needs too (proxies, snapshot mirrors
# whose Release files are past Valid-Until).
apt_acquire_conf() {
    apt-config dump 2>/dev/null | grep -E '^Acquire::(Check-Valid-Until|Check-Date|https?::Proxy|Retries) ' || true
}

# --- tether/base: debootstrap + docker import ----------------------------------------------------

build_base() {
    if [[ $REBUILD == 0 ]] && docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "$BASE_IMAGE exists (use --rebuild to rebuild it)"
        return
    fi
    [[ $(id -u) == 0 ]] || die "debootstrap needs root"
    if ! command -v debootstrap >/dev/null; then
        log "installing debootstrap"
        apt-get install -y -q -o DPkg::Lock::Timeout=300 --no-install-recommends debootstrap \
            || { apt-get update -q -o DPkg::Lock::Timeout=300 && \
                 apt-get install -y -q -o DPkg::Lock::Timeout=300 --no-install-recommends debootstrap; }
    fi
    local rootfs
    rootfs=$(mktemp -d "${TMPDIR:-/var/tmp}/tether-rootfs.XXXXXX")
    # shellcheck disable=SC2064  # expand now: the path is fixed
    trap "rm -rf '$rootfs'" EXIT
    log "debootstrap --variant=minbase $SUITE into $rootfs"
    debootstrap --variant=minbase --arch="$(dpkg --print-architecture)" "$SUITE" "$rootfs" "$MIRROR" \
        >"$rootfs.log" 2>&1 || { tail -n 30 "$rootfs.log" >&2; die "debootstrap failed (log: $rootfs.log)"; }
    rm -f "$rootfs.log"

    # apt sources and settings: the same mirror the build used.
    rm -f "$rootfs/etc/apt/sources.list"
    {
        printf 'Types: deb\nURIs: %s\nSuites: %s %s-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            "$MIRROR" "$SUITE" "$SUITE"
        if [[ -n $SECURITY_MIRROR ]]; then
            printf '\nTypes: deb\nURIs: %s\nSuites: %s-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
                "$SECURITY_MIRROR" "$SUITE"
        fi
    } >"$rootfs/etc/apt/sources.list.d/debian.sources"
    apt_acquire_conf >"$rootfs/etc/apt/apt.conf.d/90tether-acquire"
    cat >"$rootfs/etc/apt/apt.conf.d/90tether-container" <<'CONF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";
CONF
    # No documentation in the image, now or from later installs (like Debian's -slim images).
    cat >"$rootfs/etc/dpkg/dpkg.cfg.d/90tether-nodoc" <<'CONF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
CONF
    # Services installed by packages must not try to start inside an image build.
    printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
    chmod 0755 "$rootfs/usr/sbin/policy-rc.d"
    find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
    rm -rf "$rootfs"/usr/share/{man,info,locale,lintian}/* "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/var/cache/apt/* "$rootfs"/var/cache/debconf/*-old "$rootfs"/var/log/*.log \
        "$rootfs"/var/log/apt/* "$rootfs"/tmp/* "$rootfs"/root/.bash_history
    : >"$rootfs/etc/machine-id"
    rm -f "$rootfs/etc/hostname" "$rootfs/etc/resolv.conf"

    log "docker import -> $BASE_IMAGE"
    tar --numeric-owner -C "$rootfs" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["bash"]' \
        --message "debootstrap --variant=minbase $SUITE" - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
}

# --- tether/etcd and tether/tether ---------------------------------------------------------------

build_etcd() {
    log "docker build tether/etcd:$TAG (FROM $BASE)"
    docker build --pull=false --force-rm --build-arg "BASE=$BASE" \
        -t "tether/etcd:$TAG" - <"$HERE/Dockerfile.etcd"
}

build_prometheus() {
    log "docker build tether/prometheus:$TAG (FROM $BASE)"
    docker build --pull=false --force-rm --build-arg "BASE=$BASE" \
        -t "tether/prometheus:$TAG" - <"$HERE/Dockerfile.prometheus"
}

build_tether() {
    local bin=${BINARY:-$ROOT/target/release/tether}
    if [[ ! -x $bin ]]; then
        [[ -z $BINARY ]] || die "no executable at $bin"
        log "no $bin: cargo build --release -p tether"
        (cd "$ROOT" && cargo build --release -p tether)
    fi
    local ctx
    ctx=$(mktemp -d "${TMPDIR:-/var/tmp}/tether-ctx.XXXXXX")
    cp "$HERE/tether-entrypoint" "$ctx/"
    if [[ $STRIP == 1 ]] && command -v objcopy >/dev/null; then
        objcopy --strip-debug "$bin" "$ctx/tether"
    else
        cp "$bin" "$ctx/tether"
    fi
    log "docker build tether/tether:$TAG (FROM $BASE, binary $(du -h "$ctx/tether" | cut -f1))"
    docker build --pull=false --force-rm --build-arg "BASE=$BASE" -f "$HERE/Dockerfile.tether" \
        -t "tether/tether:$TAG" "$ctx" || { rm -rf "$ctx"; return 1; }
    rm -rf "$ctx"
}

T0=$SECONDS
if [[ -z $BASE ]]; then
    BASE=$BASE_IMAGE
    if want base; then
        detect_mirrors
        timed "$BASE_IMAGE" build_base
    fi
    docker image inspect "$BASE" >/dev/null 2>&1 || die "$BASE is missing (run without --only, or --only base)"
fi
want etcd && timed "tether/etcd:$TAG" build_etcd
want tether && timed "tether/tether:$TAG" build_tether
want prometheus && timed "tether/prometheus:$TAG" build_prometheus

log "build times"
printf '%s\n' "${TIMES[@]}"
printf '  %-26s %5ss\n' total $((SECONDS - T0))
log "images"
for image in "$BASE" "tether/etcd:$TAG" "tether/tether:$TAG" "tether/prometheus:$TAG"; do
    docker image inspect "$image" >/dev/null 2>&1 || continue
    SIZES+=("$(docker image inspect -f '{{.Size}}' "$image" | awk -v n="$image" '{ printf "  %-26s %6.1f MB\n", n, $1 / 1e6 }')")
done
printf '%s\n' "${SIZES[@]}"
