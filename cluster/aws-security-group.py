"""The security group that cluster/aws-gpu.yaml puts every node in: SSH (22) from one network, all
traffic among the group's own members, no other inbound traffic (outbound stays open: S3, pip, the
AWS APIs).

    python cluster/aws-security-group.py --ssh-cidr 198.51.100.7/32 [--vpc-id vpc-...] [--region ...]

It prints the group's id, for `SecurityGroupIds` in aws-gpu.yaml. Without a group of its own, Ray's
launcher creates one that admits SSH from 0.0.0.0/0. Run again, it finds the group by name and
checks that its inbound rules are still exactly these two; it never changes a group it did not just
create. AWS credentials come from the usual places (environment, profile, SSO).
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

import yaml

LAUNCHER = Path(__file__).resolve().parent / "aws-gpu.yaml"
GROUP_NAME = "jepa-ray"
# the widest network SSH may be opened to: a /8 of IPv4, a /32 of IPv6
WIDEST_PREFIX = {4: 8, 6: 32}


class SecurityGroupError(Exception):
    """A refused network, a VPC that cannot be found, or a group whose rules are not ours."""


def ssh_cidr(text: str) -> str:
    """The network SSH is opened to, normalised; refused when it is not one or is too wide."""
    try:
        net = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as e:
        raise SecurityGroupError(f"--ssh-cidr {text}: not a network address ({e})") from None
    if net.prefixlen < WIDEST_PREFIX[net.version]:
        raise SecurityGroupError(
            f"--ssh-cidr {text}: opens SSH to {net.num_addresses:,} addresses; give the network you "
            "connect from (your address/32, your office or VPN range)"
        )
    return str(net)


def inbound_rules(group_id: str, cidr: str) -> list[dict]:
    """The group's inbound rules, as EC2's IpPermissions: its members, and SSH from `cidr`."""
    if ipaddress.ip_network(cidr).version == 4:
        source = {"IpRanges": [{"CidrIp": cidr, "Description": "SSH to the Ray nodes"}]}
    else:
        source = {"Ipv6Ranges": [{"CidrIpv6": cidr, "Description": "SSH to the Ray nodes"}]}
    return [
        {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group_id}]},  # Ray among its nodes
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, **source},
    ]


def rule_set(permissions: list[dict]) -> set[tuple]:
    """IpPermissions as comparable (protocol, from port, to port, source) tuples."""
    rules = set()
    for p in permissions:
        proto = str(p["IpProtocol"])
        ports = (None, None) if proto == "-1" else (p.get("FromPort"), p.get("ToPort"))
        sources = (
            [r["CidrIp"] for r in p.get("IpRanges", [])]
            + [r["CidrIpv6"] for r in p.get("Ipv6Ranges", [])]
            + [g["GroupId"] for g in p.get("UserIdGroupPairs", [])]
            + [pl["PrefixListId"] for pl in p.get("PrefixListIds", [])]
        )
        rules.update((proto, *ports, s) for s in sources)
    return rules


def default_vpc(ec2) -> str:
    """The region's default VPC (where Ray's launcher puts nodes unless told otherwise)."""
    vpcs = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
    if not vpcs:
        raise SecurityGroupError("this region has no default VPC: pass --vpc-id")
    return vpcs[0]["VpcId"]


def ensure_group(ec2, vpc_id: str, cidr: str, name: str = GROUP_NAME) -> tuple[str, bool]:
    """(group id, created): the group made now, or the existing one if its rules are exactly ours."""
    found = ec2.describe_security_groups(
        Filters=[{"Name": "group-name", "Values": [name]}, {"Name": "vpc-id", "Values": [vpc_id]}]
    )["SecurityGroups"]
    if found:
        group_id = found[0]["GroupId"]
        want, have = rule_set(inbound_rules(group_id, cidr)), rule_set(found[0]["IpPermissions"])
        if have != want:
            raise SecurityGroupError(
                f"security group {name} ({group_id}) in {vpc_id} has inbound rules other than SSH "
                f"from {cidr} and its own members: extra {sorted(have - want, key=str)}, missing "
                f"{sorted(want - have, key=str)}; correct or delete it, or pass another --name"
            )
        return group_id, False
    group_id = ec2.create_security_group(
        GroupName=name,
        Description="jepa-ray: SSH from one network, all traffic among its own nodes",
        VpcId=vpc_id,
    )["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=inbound_rules(group_id, cidr))
    return group_id, True


def main(argv: list[str] | None = None) -> int:
    """Create or check the group; print its id. Exit 2 on a refused input or a foreign group."""
    region = yaml.safe_load(LAUNCHER.read_text())["provider"]["region"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ssh-cidr", required=True, help="the network you SSH from, e.g. 198.51.100.7/32")
    parser.add_argument("--region", default=region, help=f"AWS region (default: aws-gpu.yaml's, {region})")
    parser.add_argument("--vpc-id", help="VPC to create the group in (default: the region's default VPC)")
    parser.add_argument("--name", default=GROUP_NAME, help=f"group name (default: {GROUP_NAME})")
    args = parser.parse_args(argv)
    try:
        cidr = ssh_cidr(args.ssh_cidr)
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        ec2 = boto3.client("ec2", region_name=args.region)
        try:
            vpc_id = args.vpc_id or default_vpc(ec2)
            group_id, created = ensure_group(ec2, vpc_id, cidr, args.name)
        except (BotoCoreError, ClientError) as e:
            raise SecurityGroupError(f"AWS ({args.region}): {e}") from None
    except SecurityGroupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    what = "created" if created else "found (rules as expected)"
    print(
        f"{what}: security group {args.name} ({group_id}) in {vpc_id}: SSH from {cidr}, all traffic among its members"
    )
    print(f"in cluster/aws-gpu.yaml: SecurityGroupIds: &security-groups [{group_id}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
