#!/usr/bin/env bash
# One-time AWS setup for clusters/aws-a100.yaml (safe to run again: existing pieces are kept).
#
#   clusters/aws-setup.sh --bucket BUCKET --ssh-cidr 203.0.113.7/32 [--region us-east-1]
#
# Creates, with the AWS CLI and your current credentials:
#   - the results bucket (private: public access blocked), if it does not exist;
#   - IAM roles + instance profiles "raysd-a100-head" and "raysd-a100-worker": both may read and write
#     that bucket only; the head may also launch instances in the region, stop/terminate/tag instances
#     tagged ray-cluster-name=raysd-a100, pass the worker role and read the Deep Learning AMI's SSM id
#     (policies: clusters/aws-iam/*.json);
#   - the security group "raysd-a100" in the default VPC: SSH (22) from --ssh-cidr and all traffic between
#     members of the group, nothing else. Ray uses this group as it is (no Ray ports face the internet).
set -euo pipefail

CLUSTER=raysd-a100
REGION=us-east-1
BUCKET=""
SSH_CIDR=""
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# shellcheck source=clusters/setup-common.sh
source "$HERE/setup-common.sh"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --bucket) BUCKET="${2:-}"; shift 2 ;;
    --region) REGION="${2:-}"; shift 2 ;;
    --ssh-cidr) SSH_CIDR="${2:-}"; shift 2 ;;
    -h|--help) usage ;;
    *) echo "$(basename "$0" .sh): unknown argument $1" >&2; usage ;;
  esac
done
[[ -n "$BUCKET" && -n "$SSH_CIDR" && -n "$REGION" ]] || usage
[[ "$BUCKET" =~ ^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$ ]] || fail "bucket name '$BUCKET' is not a valid S3 bucket name"
check_ssh_cidr "$SSH_CIDR"

ACCOUNT="$(aws sts get-caller-identity --query Account --output text)"
[[ "$ACCOUNT" =~ ^[0-9]{12}$ ]] || fail "could not read the AWS account id (got '$ACCOUNT'); are credentials configured?"

render() {
  sed -e "s|__BUCKET__|$BUCKET|g" -e "s|__REGION__|$REGION|g" -e "s|__ACCOUNT__|$ACCOUNT|g" \
      -e "s|__CLUSTER__|$CLUSTER|g" "$1"
}

echo "== bucket s3://$BUCKET ($REGION)"
if aws s3api head-bucket --bucket "$BUCKET" >/dev/null 2>&1; then
  echo "   exists"
elif [[ "$REGION" == us-east-1 ]]; then
  aws s3api create-bucket --bucket "$BUCKET" --region "$REGION" >/dev/null
else
  aws s3api create-bucket --bucket "$BUCKET" --region "$REGION" \
    --create-bucket-configuration "LocationConstraint=$REGION" >/dev/null
fi
aws s3api put-public-access-block --bucket "$BUCKET" --public-access-block-configuration \
  "BlockPublicAcls=true,IgnorePublicAcls=true,BlockPublicPolicy=true,RestrictPublicBuckets=true"

for role in head worker; do
  name="$CLUSTER-$role"
  echo "== IAM role and instance profile $name"
  if ! aws iam get-role --role-name "$name" >/dev/null 2>&1; then
    aws iam create-role --role-name "$name" --description "raysd $role nodes" \
      --assume-role-policy-document "$(cat "$HERE/aws-iam/ec2-trust.json")" >/dev/null
  fi
  aws iam put-role-policy --role-name "$name" --policy-name raysd \
    --policy-document "$(render "$HERE/aws-iam/$role-policy.json")"
  if ! aws iam get-instance-profile --instance-profile-name "$name" >/dev/null 2>&1; then
    aws iam create-instance-profile --instance-profile-name "$name" >/dev/null
    aws iam add-role-to-instance-profile --instance-profile-name "$name" --role-name "$name"
  fi
done

echo "== security group $CLUSTER"
VPC="$(aws ec2 describe-vpcs --region "$REGION" --filters Name=is-default,Values=true \
  --query 'Vpcs[0].VpcId' --output text)"
[[ -n "$VPC" && "$VPC" != None ]] || fail "no default VPC in $REGION; create one (aws ec2 create-default-vpc) or edit this script"
SG="$(aws ec2 describe-security-groups --region "$REGION" \
  --filters "Name=vpc-id,Values=$VPC" "Name=group-name,Values=$CLUSTER" \
  --query 'SecurityGroups[0].GroupId' --output text)"
SSH_RULE="{\"IpProtocol\":\"tcp\",\"FromPort\":22,\"ToPort\":22,\"IpRanges\":[{\"CidrIp\":\"$SSH_CIDR\",\"Description\":\"raysd ssh\"}]}"
if [[ -z "$SG" || "$SG" == None ]]; then
  SG="$(aws ec2 create-security-group --region "$REGION" --vpc-id "$VPC" --group-name "$CLUSTER" \
    --description "raysd: SSH from one CIDR, all traffic between cluster nodes" --query GroupId --output text)"
  aws ec2 authorize-security-group-ingress --region "$REGION" --group-id "$SG" --ip-permissions \
    "[$SSH_RULE,{\"IpProtocol\":\"-1\",\"UserIdGroupPairs\":[{\"GroupId\":\"$SG\"}]}]" >/dev/null
else
  echo "   exists ($SG); adding SSH from $SSH_CIDR if it is missing"
  aws ec2 authorize-security-group-ingress --region "$REGION" --group-id "$SG" --ip-permissions "[$SSH_RULE]" \
    >/dev/null 2>&1 || true
fi

cat <<EOF

Done. Bucket s3://$BUCKET, instance profiles $CLUSTER-head / $CLUSTER-worker, security group $SG ($CLUSTER).
Next (README, "From a laptop to a GPU cluster"):
  ray get-auth-token --generate
  ray up clusters/aws-a100.yaml
EOF
