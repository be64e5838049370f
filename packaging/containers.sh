# Sourced by packaging/dist and packaging/check: make buildah and podman usable here.
#
# ensure_container_tools TOOL...  installs the missing ones (and runc) with apt-get,
#                                 then containers_conf; returns non-zero with a reason
#                                 on stderr.
# containers_conf                 adds to /etc/containers/containers.conf what podman
#                                 needs on machines without systemd as PID 1 and with a
#                                 low file-descriptor hard limit, each key only if the
#                                 file does not set it already:
#                                   [engine]     cgroup_manager = "cgroupfs"
#                                   [engine]     runtime = "runc"
#                                   [containers] default_ulimits = []

CONTAINERS_CONF=${CONTAINERS_CONF:-/etc/containers/containers.conf}

# toml_key_default FILE TABLE KEY VALUE
toml_key_default() {
    local file=$1 table=$2 key=$3 value=$4
    if [[ -f $file ]] && grep -Eq "^[[:space:]]*${key}[[:space:]]*=" "$file"; then
        return 0
    fi
    if ! { mkdir -p "$(dirname "$file")" && touch "$file"; } 2>/dev/null; then
        echo "$file needs [$table] $key = $value, and this user cannot write it (run as root)" >&2
        return 1
    fi
    if grep -Eq "^[[:space:]]*\[${table}\][[:space:]]*(#.*)?$" "$file"; then
        sed -i -E "0,/^[[:space:]]*\[${table}\][[:space:]]*(#.*)?$/s//&\n${key} = ${value}/" "$file"
    else
        printf '\n[%s]\n%s = %s\n' "$table" "$key" "$value" >>"$file"
    fi
    echo "containers.conf: set [$table] $key = $value in $file" >&2
}

containers_conf() {
    toml_key_default "$CONTAINERS_CONF" engine cgroup_manager '"cgroupfs"' &&
        toml_key_default "$CONTAINERS_CONF" engine runtime '"runc"' &&
        toml_key_default "$CONTAINERS_CONF" containers default_ulimits '[]'
}

ensure_container_tools() {
    local missing=() t
    for t in "$@" runc; do
        command -v "$t" >/dev/null || missing+=("$t")
    done
    if ((${#missing[@]})); then
        if [[ $(id -u) -ne 0 ]]; then
            echo "${missing[*]} missing, and installing them with apt-get needs root" >&2
            return 1
        fi
        echo "installing ${missing[*]} with apt-get" >&2
        if ! { apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }; then
            echo "apt-get install ${missing[*]} failed" >&2
            return 1
        fi
    fi
    containers_conf
}
