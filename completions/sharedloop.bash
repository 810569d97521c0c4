# bash completion for sharedloop(8)                         -*- shell-script -*-
#
# Installed as /usr/share/bash-completion/completions/sharedloop. Works
# with or without the bash-completion package. The words are taken from
# COMP_LINE, so names and sources that hold ':' or '=' (debian:12,
# oci:DIR, --min-age=1h) complete as one word.

# Names recorded in the stores (names/<name>, '/' stored as %2F), one a
# line. The stores are those of --loopback-root/--loopback-fallback on the
# line, else those of the configuration file, else the defaults.
_sharedloop_names()
{
    local root="" fallback="" conf_root="" conf_fallback="" i w conf line d f n
    local -a parts
    for ((i = 1; i < ${#_sl_words[@]}; i++)); do
        w=${_sl_words[i]}
        case $w in
            --loopback-root=*) root=${w#*=} ;;
            --loopback-fallback=*) fallback=${w#*=} ;;
            --loopback-root) root=${_sl_words[i + 1]-} ;;
            --loopback-fallback) fallback=${_sl_words[i + 1]-} ;;
        esac
    done
    conf=${SHAREDLOOP_CONFIG:-/etc/sharedloop/sharedloop.conf}
    if [[ (-z $root || -z $fallback) && -r $conf ]]; then
        while IFS= read -r line || [[ -n $line ]]; do
            line=${line%%#*}
            IFS=, read -r -a parts <<<"$line"
            for w in "${parts[@]}"; do
                w=${w//[[:space:]\"]/}
                case $w in
                    loopback_root=*) conf_root=${w#*=} ;;
                    loopback_fallback=*) conf_fallback=${w#*=} ;;
                esac
            done
        done <"$conf"
        : "${root:=${conf_root-}}" "${fallback:=${conf_fallback-}}"
    fi
    : "${root:=/var/lib/sharedloop/root}" "${fallback:=/var/lib/sharedloop/private}"
    for d in "$root" "$fallback"; do
        [[ -d $d/names && -r $d/names ]] || continue
        for f in "$d"/names/*; do
            [[ -f $f ]] || continue
            n=${f##*/}
            [[ $n == .* ]] && continue
            printf '%s\n' "${n//%2F//}"
        done
    done | LC_ALL=C sort -u
}

# Add to COMPREPLY the arguments that start with $cur, less the part of
# $cur that readline keeps (up to its last ':' or '=', when those break
# words in COMP_WORDBREAKS).
_sharedloop_reply()
{
    local c keep="" k2
    if [[ $COMP_WORDBREAKS == *:* && $cur == *:* ]]; then
        keep=${cur%"${cur##*:}"}
    fi
    if [[ $COMP_WORDBREAKS == *=* && $cur == *=* ]]; then
        k2=${cur%"${cur##*=}"}
        ((${#k2} > ${#keep})) && keep=$k2
    fi
    for c in "$@"; do
        [[ $c == "$cur"* ]] && COMPREPLY+=("${c#"$keep"}")
    done
}

# Like _sharedloop_reply, with $1 put before each of the other arguments.
_sharedloop_reply_pre()
{
    local pre=$1 c
    local -a all=()
    shift
    for c in "$@"; do
        all+=("$pre$c")
    done
    _sharedloop_reply "${all[@]}"
}

# Paths: $1 is -d (directories) or -f (files and directories), $2 the part
# of $cur before the path (oci:, --loopback-root=, ...).
_sharedloop_paths()
{
    local -a paths=()
    mapfile -t paths < <(compgen "$1" -- "${cur#"$2"}")
    compopt -o filenames 2>/dev/null
    _sharedloop_reply_pre "$2" "${paths[@]}"
}

_sharedloop()
{
    local line=${COMP_LINE:0:${COMP_POINT:-${#COMP_LINE}}}
    local -a _sl_words=()
    read -r -a _sl_words <<<"$line"
    local cur="" prev="" value_pre=""
    if [[ $line != *[[:space:]] && ${#_sl_words[@]} -gt 1 ]]; then
        cur=${_sl_words[-1]}
        unset '_sl_words[-1]'
    fi
    prev=${_sl_words[-1]-}
    COMPREPLY=()

    local -a commands=(add import ls rm gc verify bundle unbundle status mounts help)
    local -a global=(--loopback-root --loopback-fallback -v --verbose -h --help)
    local -a names=()

    # --option=value: complete the value.
    if [[ $cur == --*=* ]]; then
        prev=${cur%%=*}
        value_pre="$prev="
    fi

    case $prev in
        --loopback-root | --loopback-fallback | --staging-dir | --cert-dir)
            _sharedloop_paths -d "$value_pre"
            return
            ;;
        --authfile | --registries-conf)
            _sharedloop_paths -f "$value_pre"
            return
            ;;
        --platform)
            _sharedloop_reply_pre "$value_pre" linux/amd64 linux/arm64 linux/arm/v7 linux/ppc64le linux/s390x linux/riscv64
            return
            ;;
        --tls-verify)
            # Only as --tls-verify=BOOL (a bare --tls-verify means true).
            if [[ -n $value_pre ]]; then
                _sharedloop_reply_pre "$value_pre" true false
                return
            fi
            ;;
        --creds)
            return
            ;;
        --fstype)
            _sharedloop_reply_pre "$value_pre" ext4 xfs erofs auto
            return
            ;;
        --compress)
            _sharedloop_reply_pre "$value_pre" none lz4
            return
            ;;
        --parent | --name)
            mapfile -t names < <(_sharedloop_names)
            _sharedloop_reply_pre "$value_pre" "${names[@]}"
            return
            ;;
        --min-age)
            _sharedloop_reply_pre "$value_pre" 10m 1h 12h 1d 7d
            return
            ;;
        -o | --options)
            _sharedloop_reply_pre "$value_pre" upper=tmpfs upper=
            compopt -o nospace 2>/dev/null
            return
            ;;
    esac
    [[ -n $value_pre ]] && return

    # The command is the first word that is neither an option nor the
    # value of one; nargs counts the words after it.
    local i w cmd="" nargs=0
    for ((i = 1; i < ${#_sl_words[@]}; i++)); do
        w=${_sl_words[i]}
        case $w in
            --loopback-root | --loopback-fallback | --parent | --name | --fstype | --compress | --min-age | --staging-dir | -o | --options | \
                --creds | --authfile | --cert-dir | --platform | --registries-conf)
                ((i++))
                ;;
            --)
                # bundle: what follows is the container's command.
                [[ $cmd == bundle ]] && return
                ;;
            -*) ;;
            *)
                if [[ -z $cmd ]]; then
                    cmd=$w
                else
                    ((nargs++))
                fi
                ;;
        esac
    done

    if [[ -z $cmd ]]; then
        if [[ $cur == -* ]]; then
            _sharedloop_reply "${global[@]}" -V --version
        else
            _sharedloop_reply "${commands[@]}"
        fi
        return
    fi

    local -a opts=()
    case $cmd in
        add) opts=(--parent --name --fstype --compress --staging-dir) ;;
        import) opts=(--name --fstype --compress --staging-dir -q --quiet --creds --authfile --tls-verify --cert-dir --platform --registries-conf) ;;
        ls | status | mounts) opts=(--json) ;;
        rm) opts=(--name-only --dry-run --json) ;;
        gc) opts=(--dry-run --min-age --json) ;;
        verify) opts=(--deep --json) ;;
        bundle) opts=(-o --options) ;;
        unbundle) opts=() ;;
        help)
            ((nargs == 0)) && _sharedloop_reply "${commands[@]}"
            return
            ;;
        *) return ;;
    esac
    if [[ $cur == -* ]]; then
        _sharedloop_reply "${opts[@]}" "${global[@]}"
        return
    fi

    case $cmd in
        add)
            ((nargs == 0)) && _sharedloop_paths -d ""
            ;;
        import)
            ((nargs == 0)) || return
            case $cur in
                oci:*) _sharedloop_paths -d "oci:" ;;
                oci-archive:*) _sharedloop_paths -f "oci-archive:" ;;
                docker-archive:*) _sharedloop_paths -f "docker-archive:" ;;
                docker://*) ;;
                *)
                    _sharedloop_reply oci: oci-archive: docker-archive: docker://
                    compopt -o nospace 2>/dev/null
                    ;;
            esac
            ;;
        ls)
            # One image (or layer ID): its layers.
            ((nargs == 0)) || return
            mapfile -t names < <(_sharedloop_names)
            _sharedloop_reply "${names[@]}"
            ;;
        rm | verify)
            mapfile -t names < <(_sharedloop_names)
            _sharedloop_reply "${names[@]}"
            ;;
        bundle)
            if ((nargs == 0)); then
                mapfile -t names < <(_sharedloop_names)
                _sharedloop_reply "${names[@]}"
            elif ((nargs == 1)); then
                _sharedloop_paths -d ""
            fi
            ;;
        unbundle)
            ((nargs == 0)) && _sharedloop_paths -d ""
            ;;
    esac
}

complete -F _sharedloop sharedloop

# ex: filetype=sh
