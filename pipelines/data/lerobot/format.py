"""The LeRobot dataset layout: paths, feature keys and file sizes of codebase_version v3.0 (written and read) and v2.x
(read only).

Taken from lerobot 0.6.1 (``src/lerobot/datasets``, ``docs/source/lerobot-dataset-v3.mdx``); lerobot 0.4+ loads v3.0
and refuses older versions (``BackwardCompatibilityError``).
"""

CODEBASE_VERSION = "v3.0"
# v3.0 holds many episodes per file: a new data / video file starts once one passes its size, CHUNKS_SIZE per folder
CHUNKS_SIZE = 1000  # files per chunk folder (LeRobot's DEFAULT_CHUNK_SIZE)
DATA_FILE_SIZE_MB = 100  # LeRobot's DEFAULT_DATA_FILE_SIZE_IN_MB
VIDEO_FILE_SIZE_MB = 200  # LeRobot's DEFAULT_VIDEO_FILE_SIZE_IN_MB

INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"  # one row group per episode
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"  # the episodes one after another
# One row per episode locating its rows and video spans; LeRobot reads them positionally, so row i is episode i.
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V3_TASKS_PATH = "meta/tasks.parquet"
V3_EPISODES_DIR = "meta/episodes"
# v2.0 / v2.1 (read only): one parquet and one mp4 per episode
V2_EPISODES_PATH = "meta/episodes.jsonl"
V2_TASKS_PATH = "meta/tasks.jsonl"

STATE_KEY = "observation.state"
ACTION_KEY = "action"
SUCCESS_KEY = "next.success"
DONE_KEY = "next.done"
CAMERA_PREFIX = "observation.images."


def camera_name(video_key: str) -> str:
    """``observation.images.top`` -> ``top``; keys without that prefix are kept whole."""
    return video_key.removeprefix(CAMERA_PREFIX)
