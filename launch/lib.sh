# Shared by the launch/ scripts (sourced, not run): print-or-run a command, errors, quoting.
#
# Every command a script runs goes through `run`, so `--dry-run` prints exactly what would run:
# one line per command, each word quoted so that a shell — or Python's shlex.split —
# reads the line back as the same words.

DRY_RUN=0

die() {
  printf '%s: %s\n' "${0##*/}" "$*" >&2
  exit 2
}

# quoted WORD... -> the words as one shell-quoted line (no newline): plain words as they are, others
# in single quotes, or escaped by printf %q when they hold a single quote
quoted() {
  local out="" word
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+="${out:+ }$word"
    elif [[ $word != *"'"* && $word != *$'\n'* ]]; then
      out+="${out:+ }'$word'"
    else
      out+="${out:+ }$(printf '%q' "$word")"
    fi
  done
  printf '%s' "$out"
}

# run CMD [ARG...]: print it (--dry-run) or run it
run() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s\n' "$(quoted "$@")"
  else
    "$@"
  fi
}

# run_exec CMD [ARG...]: print it (--dry-run) or become it (signals reach it directly)
run_exec() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s\n' "$(quoted "$@")"
    exit 0
  fi
  exec "$@"
}

# standard_option WORD: handle --dry-run, -h/--help and unknown options; false for any other word
# (the end of a script's options)
standard_option() {
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) print_help "$0"; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) return 1 ;;
  esac
}

# need_value OPTION "$@": the option's value must follow it
need_value() {
  [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"
}

# print_help FILE: the comment block at the top of FILE after the shebang, without the '# '
# (and without #SBATCH lines or shellcheck directives)
print_help() {
  sed -n '2,/^[^#]/{/^#SBATCH/d;/^# shellcheck/d;/^#/!q;s/^# \{0,1\}//;p}' "$1"
}
