# The fast framing's setup, sent once over the backdoor (/dev/hvc0) after its banner; the
# host fills in @NONCE@ and @TOKEN@. It defines the functions the host calls per command
# (__nr_run, __nr_q, __nr_big), starts the control-port reader and a watcher of the backdoor's
# death, and answers R<nonce> <out port> <ctl port>. See shell/fast.py for the protocol.
# shellcheck shell=bash disable=SC2034,SC2317
# __nr_me is set in each command's subshell, where kill() reads it (SC2030, SC2031).
# shellcheck disable=SC2030,SC2031
if [[ -z ${__nr_ready-} ]]; then
  __nr_out='' __nr_ctl='' __nr_fd='' __nr_last=0 __nr_child='' __nr_sig='' __nr_pend=''
  __nr_pidf=/proc/sys/kernel/ns_last_pid
  [ -r "$__nr_pidf" ] || __nr_pidf=/dev/null
  exec < /dev/null
  for __nr_p in /sys/class/virtio-ports/*; do
    read -r __nr_n 2>/dev/null < "$__nr_p/name" || continue
    case "$__nr_n" in
      org.nixos-repl.out) __nr_out=/dev/${__nr_p##*/} ;;
      org.nixos-repl.ctl) __nr_ctl=/dev/${__nr_p##*/} ;;
    esac
  done
  __nr_cur=/run/nixos-repl.cmd
  { : > "$__nr_cur"; } 2>/dev/null || __nr_cur=/tmp/.nixos-repl.cmd
  exec {__nr_w}> >(read -r __nr_x; printf '\nD%s\n' @TOKEN@)
  __nr_wpid=$!
  __nr_open() {
    [[ -n $__nr_fd ]] || { exec {__nr_fd}<> "$__nr_out"; } 2>/dev/null || { __nr_fd=; return 1; }
  }
  __nr_run() {
    if ! __nr_open; then printf 'E%s busy\n' "$1"; return; fi
    printf %s "$1" > "$__nr_cur"
    printf '\0nixos-repl:%s\n' "$1" >&"$__nr_fd"
    __nr_c=$2
    __nr_go "$1"
  }
  __nr_q() {
    if ! __nr_open; then printf 'E%s busy\n' "$1"; return; fi
    printf %s "$1" > "$__nr_cur"
    __nr_c=$2
    __nr_go "$1"
  }
  __nr_big() {
    if ! __nr_open; then printf 'E%s busy\n' "$1"; return; fi
    printf %s "$1" > "$__nr_cur"
    printf 'G%s\n' "$1"
    __nr_c=$(exec {__nr_w}>&-; head -c "$2" <&"$__nr_fd")
    printf 'T%s\n' "$1"
    if [[ ${__nr_c: -16} != "$1" ]]; then __nr_c=; printf 'E%s garbled\n' "$1"; return; fi
    __nr_c=${__nr_c:0:-16}
    printf '\0nixos-repl:%s\n' "$1" >&"$__nr_fd"
    __nr_go "$1"
  }
  __nr_go() {
    __nr_child=- __nr_pend=
    ( set --; trap : INT QUIT; trap - INT QUIT; __nr_me=$BASHPID; set -euo pipefail; eval "$__nr_c"
    ) >&"$__nr_fd" {__nr_fd}>&- {__nr_w}>&- &
    __nr_child=$! __nr_sig='' __nr_c=''
    # A signal that came before $! was known (the command may run first) is passed on now.
    [[ -z $__nr_pend ]] || kill -s "$__nr_pend" "$__nr_child" 2>/dev/null
    wait "$__nr_child"; __nr_s=$?
    while [[ -n $__nr_sig ]]; do __nr_sig=; wait "$__nr_child"; __nr_s=$?; done
    __nr_child='' __nr_h=0
    read -r __nr_pid < "$__nr_pidf"
    if (( __nr_pid != __nr_last + 1 )); then
      exec {__nr_fd}>&-
      if ! { exec {__nr_fd}<> "$__nr_out"; } 2>/dev/null; then __nr_h=1 __nr_fd=; fi
    fi
    __nr_last=$__nr_pid
    printf 'E%s %s %s\n' "$1" "$__nr_s" "$__nr_h"
  }
  __nr_pass() {
    if [[ $__nr_child == - ]]; then __nr_pend=$1
    elif [[ -n $__nr_child ]]; then __nr_sig=1; kill -s "$1" "$__nr_child" 2>/dev/null
    else trap - "$1"; kill -s "$1" $$; fi
  }
  # In a command, `kill $$` signals the command itself (as in nixpkgs' `bash -c`), at once.
  kill() {
    local __nr_a=() __nr_x
    for __nr_x; do
      [[ -n ${__nr_me-} && $__nr_x == "$$" ]] && __nr_x=$__nr_me
      __nr_a+=("$__nr_x")
    done
    builtin kill "${__nr_a[@]}"
  }
  trap '__nr_pass TERM' TERM
  trap '__nr_pass INT' INT
  __nr_kill() {
    local p t kids=()
    [[ -n $1 ]] && kill -STOP "$1" 2>/dev/null || return 0
    for t in /proc/"$1"/task/*/children; do
      read -r -a p 2>/dev/null < "$t"; kids+=("${p[@]}")
    done
    for p in "${kids[@]}"; do __nr_kill "$p"; done
    kill -KILL "$1" 2>/dev/null
    kill -CONT "$1" 2>/dev/null
  }
  # The pids of the processes holding the out port (the backdoor shell's own copy aside).
  __nr_holders() {
    local f p
    __nr_hs=()
    for f in /proc/[0-9]*/fd/*; do
      p=${f#/proc/}; p=${p%%/*}
      if [ "$p" != $$ ] && [[ $f -ef $__nr_out ]]; then __nr_hs+=("$p"); fi
    done
  }
  # K <nonce>: kill that command's process tree (the backdoor's child, whatever it did with its
  # output) and every holder of the out port; K '*': the holders only. The nonce is checked
  # again after the pids are gathered: if it is still current, none of them is a later command.
  __nr_stop() {
    local p kids=()
    read -r __nr_now < "$__nr_cur"
    [[ $1 == '*' || $1 == "$__nr_now" ]] || return 0
    [[ $1 == '*' ]] || read -r -a kids 2>/dev/null < "/proc/$$/task/$$/children"
    __nr_holders
    read -r __nr_now < "$__nr_cur"
    [[ $1 == '*' || $1 == "$__nr_now" ]] || return 0
    for p in "${kids[@]}" "${__nr_hs[@]}"; do
      [[ $p == "$BASHPID" || $p == "$__nr_wpid" ]] || __nr_kill "$p"
    done
  }
  if [ -c "$__nr_out" ] && [ -c "$__nr_ctl" ]; then
    ( exec 3< "$__nr_ctl" < /dev/null > /dev/null {__nr_w}>&-
      while read -r -u 3 __nr_cmd __nr_arg; do
        case "$__nr_cmd" in
          K) __nr_stop "$__nr_arg" ;;
        esac
      done ) &
  fi
  __nr_ready=1
fi
printf 'R%s %s %s\n' @NONCE@ "${__nr_out:-none}" "${__nr_ctl:-none}"
