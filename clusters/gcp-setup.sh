#!/usr/bin/env bash
# One-time Google Cloud setup for clusters/gcp-a100.yaml (safe to run again: existing pieces are kept).
#
#   clusters/gcp-setup.sh --project PROJECT --bucket BUCKET --ssh-cidr 203.0.113.7/32 [--region us-central1]
#
# Creates, with gcloud and your current credentials:
#   - the VPC "raysd-net" with subnet "raysd-subnet" and two firewall rules: SSH (22) from --ssh-cidr to
#     nodes tagged "raysd", and all traffic between nodes tagged "raysd"; nothing else is let in;
#   - service accounts raysd-head and raysd-worker: both get roles/storage.objectAdmin on the results
#     bucket only; raysd-head also gets roles/compute.instanceAdmin.v1 (the autoscaler creates and deletes
#     VMs) and roles/iam.serviceAccountUser on raysd-worker only (to start workers as raysd-worker);
#   - the results bucket (uniform access, public access prevented), if it does not exist;
#   - clusters/gcp-a100.PROJECT.yaml: clusters/gcp-a100.yaml with the project filled in.
set -euo pipefail

CLUSTER=raysd-a100
REGION=us-central1
PROJECT=""
BUCKET=""
SSH_CIDR=""
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# shellcheck source=clusters/setup-common.sh
source "$HERE/setup-common.sh"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --project) PROJECT="${2:-}"; shift 2 ;;
    --bucket) BUCKET="${2:-}"; shift 2 ;;
    --region) REGION="${2:-}"; shift 2 ;;
    --ssh-cidr) SSH_CIDR="${2:-}"; shift 2 ;;
    -h|--help) usage ;;
    *) echo "$(basename "$0" .sh): unknown argument $1" >&2; usage ;;
  esac
done
[[ -n "$PROJECT" && -n "$BUCKET" && -n "$SSH_CIDR" && -n "$REGION" ]] || usage
[[ "$PROJECT" =~ ^[a-z][a-z0-9-]{4,28}[a-z0-9]$ ]] || fail "'$PROJECT' is not a Google Cloud project id"
[[ "$BUCKET" =~ ^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$ ]] || fail "bucket name '$BUCKET' is not a valid bucket name"
check_ssh_cidr "$SSH_CIDR"

G=(gcloud --project "$PROJECT" --quiet)
HEAD_SA="raysd-head@$PROJECT.iam.gserviceaccount.com"
WORKER_SA="raysd-worker@$PROJECT.iam.gserviceaccount.com"

echo "== network raysd-net / raysd-subnet ($REGION) and firewall"
"${G[@]}" compute networks describe raysd-net >/dev/null 2>&1 ||
  "${G[@]}" compute networks create raysd-net --subnet-mode=custom
"${G[@]}" compute networks subnets describe raysd-subnet --region "$REGION" >/dev/null 2>&1 ||
  "${G[@]}" compute networks subnets create raysd-subnet --network raysd-net --region "$REGION" \
    --range 10.42.0.0/20
"${G[@]}" compute firewall-rules describe raysd-allow-ssh >/dev/null 2>&1 ||
  "${G[@]}" compute firewall-rules create raysd-allow-ssh --network raysd-net --direction INGRESS \
    --allow tcp:22 --source-ranges "$SSH_CIDR" --target-tags raysd
"${G[@]}" compute firewall-rules describe raysd-allow-internal >/dev/null 2>&1 ||
  "${G[@]}" compute firewall-rules create raysd-allow-internal --network raysd-net --direction INGRESS \
    --allow tcp,udp,icmp --source-tags raysd --target-tags raysd

echo "== service accounts"
for sa in raysd-head raysd-worker; do
  "${G[@]}" iam service-accounts describe "$sa@$PROJECT.iam.gserviceaccount.com" >/dev/null 2>&1 ||
    "${G[@]}" iam service-accounts create "$sa" --display-name "raysd ${sa#raysd-} nodes"
done

echo "== bucket gs://$BUCKET"
"${G[@]}" storage buckets describe "gs://$BUCKET" >/dev/null 2>&1 ||
  "${G[@]}" storage buckets create "gs://$BUCKET" --location "$REGION" --uniform-bucket-level-access \
    --public-access-prevention
for sa in "$HEAD_SA" "$WORKER_SA"; do
  "${G[@]}" storage buckets add-iam-policy-binding "gs://$BUCKET" --member "serviceAccount:$sa" \
    --role roles/storage.objectAdmin >/dev/null
done

echo "== autoscaler rights for raysd-head"
"${G[@]}" projects add-iam-policy-binding "$PROJECT" --member "serviceAccount:$HEAD_SA" \
  --role roles/compute.instanceAdmin.v1 --condition=None >/dev/null
"${G[@]}" iam service-accounts add-iam-policy-binding "$WORKER_SA" --member "serviceAccount:$HEAD_SA" \
  --role roles/iam.serviceAccountUser >/dev/null

OUT="$HERE/gcp-a100.$PROJECT.yaml"
sed -e "s|__PROJECT__|$PROJECT|g" -e "s|us-central1|$REGION|g" "$HERE/gcp-a100.yaml" > "$OUT.tmp"
[[ "$REGION" == us-central1 ]] || echo "   note: check that availability_zone $REGION-a in $OUT offers a2-highgpu-8g"
mv "$OUT.tmp" "$OUT"

cat <<EOF

Done. Network raysd-net (SSH from $SSH_CIDR only), service accounts raysd-head / raysd-worker, bucket gs://$BUCKET.
Next (README, "From a laptop to a GPU cluster"):
  ray get-auth-token --generate
  ray up $OUT
EOF
