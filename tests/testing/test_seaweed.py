import boto3
import pyarrow.fs as pafs
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError


def test_signed_requests_round_trip(s3_server):
    s3_server.make_bucket("roundtrip")
    c = s3_server.boto3_client()
    c.put_object(Bucket="roundtrip", Key="a/b", Body=b"hello")
    assert c.get_object(Bucket="roundtrip", Key="a/b")["Body"].read() == b"hello"
    fs = pafs.S3FileSystem(endpoint_override=s3_server.endpoint.removeprefix("http://"), scheme="http", region=s3_server.region,
                           access_key=s3_server.access_key, secret_key=s3_server.secret_key)
    with fs.open_output_stream("roundtrip/x.bin") as f:
        f.write(b"\x00\x01")
    with fs.open_input_file("roundtrip/x.bin") as f:
        assert f.read() == b"\x00\x01"


def test_wrong_secret_is_refused(s3_server):
    bad = boto3.client("s3", endpoint_url=s3_server.endpoint, aws_access_key_id=s3_server.access_key,
                       aws_secret_access_key="wrong", region_name=s3_server.region, config=Config(retries={"max_attempts": 1}))
    with pytest.raises(ClientError):
        bad.list_buckets()
