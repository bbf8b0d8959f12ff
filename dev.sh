#!/usr/bin/env bash
# One entry point that prepares a fresh Debian 12 machine and then runs the demo or the tests.
#   ./dev.sh demo    the REPL on two tiny guests (without a terminal: a scripted tour, exit 0)
#   ./dev.sh test    lint, type-check and run the whole test suite against real guests
# Every step is idempotent: a second run only checks and goes straight to the work.
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(
    qemu-system-x86 qemu-utils        # the VMs
    linux-image-amd64                 # the tiny guest's kernel and modules
    busybox-static bash-static        # the tiny guest's userland
    netcat-openbsd                    # nc -z / -U inside the tiny guest (nixpkgs calls it)
    lz4 util-linux                    # initramfs compression; setpriv
    debootstrap e2fsprogs             # the debian guest's root filesystem (mkfs.ext4 -d)
    vde2                              # VLANs (vde_switch)
    systemd-container                 # containers (systemd-nspawn)
    tesseract-ocr tesseract-ocr-eng   # OCR
    tmux                              # tests drive the terminal REPL through it
    shellcheck                        # tests lint the guest-side bash of the shell channel
    chromium chromium-driver          # tests open JupyterLab in headless chromium
    nix-bin                           # tests parse flake.nix and evaluate it against a stub nixpkgs
)

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null; then echo sudo; else
            echo "error: installing ${missing[*]} needs root (or sudo)" >&2; exit 1
        fi
    fi
}

install_apt() {
    local missing=() p
    # Debian's own python3 needs python3-venv for `python3 -m venv`.
    python3 -c 'import ensurepip, venv' 2>/dev/null || APT_PACKAGES+=(python3 python3-venv)
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        local sudo; sudo=$(need_root)
        echo "== installing Debian packages: ${missing[*]}"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

install_venv() {
    local stamp=.venv/.installed
    if [ ! -x .venv/bin/python ]; then
        echo "== creating .venv"
        python3 -m venv .venv
    fi
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        echo "== installing nixos-repl into .venv"
        .venv/bin/pip install -q --upgrade pip >/dev/null
        .venv/bin/pip install -q -e '.[dev]'
        touch "$stamp"
    fi
}

setup() {
    install_apt
    install_venv
    # Build (or reuse from the cache) the embedded guests the demo and the tests boot.
    .venv/bin/nixos-repl guest build tiny --name vm1 --name vm2 --out .venv/guests >/dev/null
}

case "${1:-}" in
    demo)
        setup
        NIXOS_REPL_ACCEL="${NIXOS_REPL_ACCEL:-tcg}" exec .venv/bin/nixos-repl --demo
        ;;
    test)
        setup
        echo "== ruff"; .venv/bin/ruff check . && .venv/bin/ruff format --check .
        echo "== mypy"; .venv/bin/mypy --strict nixos_repl test_driver tests bench
        echo "== pytest"; NIXOS_REPL_ACCEL="${NIXOS_REPL_ACCEL:-tcg}" .venv/bin/pytest -q "${@:2}"
        ;;
    *)
        echo "usage: $0 demo|test" >&2; exit 2 ;;
esac
