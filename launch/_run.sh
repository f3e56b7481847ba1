# Sourced by the launch scripts: `--dry-run` as the first argument prints the command instead of
# running it (shell-quoted, one line), so every launcher can be checked on a machine without GPUs.
dry_run=""
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
fi

run() {
  if [[ -n "$dry_run" ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    exec "$@"
  fi
}
