"""Live spot prices through boto3; the catalog's list prices are read by infra/hardware.py."""

from __future__ import annotations


def live_spot_price(instance_type: str, region: str, endpoint_url: str | None = None) -> float | None:
    """The latest Linux spot price through boto3, or None without credentials or data."""
    try:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
    except ImportError:
        return None
    try:
        ec2 = boto3.client("ec2", region_name=region, endpoint_url=endpoint_url)
        history = ec2.describe_spot_price_history(InstanceTypes=[instance_type], MaxResults=20,
                                                  ProductDescriptions=["Linux/UNIX"])["SpotPriceHistory"]
    except (NoCredentialsError, BotoCoreError, ClientError):
        return None
    if not history:
        return None
    latest = max(history, key=lambda h: h["Timestamp"])
    return float(latest["SpotPrice"])
