"""A Cloud Storage API server for the tests: ``gcp-storage-emulator`` with GCS's preconditions.

``python tests/gcs_emulator.py PORT`` serves the GCS JSON API on localhost:PORT (in memory, with
a bucket named ``bucket``); clients reach it through ``STORAGE_EMULATOR_HOST``. The emulator
(2026.7.19) ignores ``ifGenerationMatch`` (a second create with ``if_generation_match=0``
succeeds) and sends no ``x-goog-generation`` header with a download, both of which real Cloud
Storage honours and the workdir lease relies on. This launcher adds them to the emulator's own
object handlers, as documented for GCS (https://cloud.google.com/storage/docs/request-preconditions):
a request whose ``ifGenerationMatch`` is not the live object's generation (0: the object must
not exist) is answered 412 without effect; each object request runs alone, so a check and its
write are one step. Everything else is the emulator's.
"""

import sys
import threading
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

BUCKET = "bucket"
_ONE_AT_A_TIME = threading.Lock()


def _object_name(request) -> str | None:
    name = request.params.get("object_id")
    if name is None and "name" in request.query:
        name = request.query["name"][0]
    if name is None and isinstance(request.data, dict):
        name = (request.data.get("meta") or {}).get("name")
    return name


def _live_generation(storage, bucket: str, name: str) -> str:
    try:
        return str(storage.get_file_obj(bucket, name)["generation"])
    except Exception:  # noqa: BLE001  (the emulator's NotFound): no live object
        return "0"


def _with_preconditions(handler):
    def handle(request, response, storage, *args, **kwargs):
        with _ONE_AT_A_TIME:
            expected = request.query.get("ifGenerationMatch", [None])[0]
            name = _object_name(request)
            bucket = request.params.get("bucket_name")
            if expected is not None and name is not None:
                if _live_generation(storage, bucket, name) != str(expected):
                    response.status = HTTPStatus.PRECONDITION_FAILED
                    response.json({"error": {"code": 412, "message": "Precondition Failed"}})
                    return None
            if name is not None and handler is objects.download:
                generation = _live_generation(storage, bucket, name)
                if generation != "0":
                    response["x-goog-generation"] = generation
            return handler(request, response, storage, *args, **kwargs)
    return handle


def _patch() -> None:
    wrapped = {}
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler in (objects.insert, objects.download, objects.delete, objects.get,
                           objects.upload_partial, objects.xml_upload):
                handlers[method] = wrapped.setdefault(handler, _with_preconditions(handler))
    objects.insert = wrapped[objects.insert]  # the router's fallback for bare upload paths


def main(port: int) -> None:
    _patch()
    emulator = server.create_server("localhost", port, in_memory=True, default_bucket=BUCKET)
    emulator.run()  # serves until killed


if __name__ == "__main__":
    main(int(sys.argv[1]))
