"""The wire contract's Python side: the modules generated from proto/posefix/v1/posefix.proto by
scripts/gen_proto.py (never edited by hand; regenerate after changing the .proto), and the mapping
from the contract's keypoint formats to :mod:`posefix.formats` layouts."""
from .posefix.v1 import posefix_pb2 as pb2
from .posefix.v1 import posefix_pb2_grpc as pb2_grpc

# KeypointFormat enum value → posefix.formats.LAYOUTS key.
FORMAT_LAYOUT: dict[int, str] = {
    pb2.KEYPOINT_FORMAT_COCO_17: "coco17",
    pb2.KEYPOINT_FORMAT_BLAZEPOSE_33: "blazepose33",
    pb2.KEYPOINT_FORMAT_OPENPOSE_BODY_25: "body25",
    pb2.KEYPOINT_FORMAT_OPENPOSE_COCO_18: "coco18",
}
SERVICE_NAME: str = pb2.DESCRIPTOR.services_by_name["PoseRefiner"].full_name

__all__ = ["FORMAT_LAYOUT", "SERVICE_NAME", "pb2", "pb2_grpc"]
