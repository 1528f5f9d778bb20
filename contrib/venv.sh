# Sourced by contrib/quickstart and tests/run: make sure ./.venv exists with ncps
# and its dependencies installed (extras in $NCPS_EXTRAS, e.g. "test").
# Installs Debian's python3-venv first when venv is missing and we are root.
ncps_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ncps_venv="$ncps_root/.venv"
ncps_stamp="$ncps_venv/.ncps-installed-${NCPS_EXTRAS:-base}"
if [ ! -x "$ncps_venv/bin/python" ]; then
  if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-pip >/dev/null
    else
      echo "python3 venv module missing: install python3-venv" >&2; exit 1
    fi
  fi
  python3 -m venv "$ncps_venv"
fi
if [ ! -e "$ncps_stamp" ] || [ "$ncps_root/pyproject.toml" -nt "$ncps_stamp" ]; then
  spec="$ncps_root"; [ -n "${NCPS_EXTRAS:-}" ] && spec="$ncps_root[$NCPS_EXTRAS]"
  "$ncps_venv/bin/python" -m pip install -q --upgrade pip >/dev/null
  # compat mode puts the checkout on sys.path, where Twisted looks for dropins
  "$ncps_venv/bin/python" -m pip install -q -e "$spec" --config-settings editable_mode=compat
  touch "$ncps_stamp"
fi
