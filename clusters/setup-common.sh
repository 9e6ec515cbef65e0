# Sourced by aws-setup.sh and gcp-setup.sh: their usage text, error exit and the SSH source check.

usage() {
  sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

fail() { echo "$(basename "$0" .sh): $*" >&2; exit 1; }

# The one address range allowed to reach SSH: an IPv4 CIDR no wider than /8.
check_ssh_cidr() {
  [[ "$1" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}$ ]] || fail "--ssh-cidr '$1' is not an IPv4 CIDR (e.g. 203.0.113.7/32)"
  [[ "${1#*/}" -ge 8 ]] || fail "--ssh-cidr $1 opens SSH to too much of the internet; give your own address, e.g. <your ip>/32"
}
