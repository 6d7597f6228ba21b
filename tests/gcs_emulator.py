"""``python -m tests.gcs_emulator PORT BUCKET``: the gcp-storage-emulator GCS API server (in memory) with one
bucket, plus the parts of GCS's API that it lacks and that the harness relies on: object generations and
suffix byte ranges.

gcp-storage-emulator (2026.7.19) ignores the generation preconditions ``ifGenerationMatch`` /
``ifGenerationNotMatch`` (a conditional upload or delete always succeeds), and its media downloads carry no
``x-goog-generation`` header. The workdir lease rests on the preconditions, and tensorstore (orbax's OCDBT
checkpoints) on both: without the header every read-modify-write of an OCDBT manifest fails with
"Malformed StorageGeneration". This adds them as GCS documents them
(https://cloud.google.com/storage/docs/request-preconditions; tensorstore's own GCS mock,
tensorstore/kvstore/gcs_http/gcs_mock.cc, answers the same way):

- upload (``objects.insert``: media, multipart, start of a resumable upload) and delete: HTTP 412 unless the
  object's live generation is ``ifGenerationMatch`` (``0``: the object must not exist), and 412 if it is
  ``ifGenerationNotMatch``;
- read (metadata or media): 412 if the live generation is not ``ifGenerationMatch``, 304 if it is
  ``ifGenerationNotMatch``; media responses carry ``x-goog-generation`` and ``x-goog-metageneration``.

The server handles one request at a time, so a check and the write after it are atomic, as on GCS.

A media download with ``Range: bytes=-N`` gets the object's last N bytes (HTTP 206), as GCS documents
(https://cloud.google.com/storage/docs/xml-api/reference-headers#range); the emulator ignores such a range
and sends the whole object. ArrayRecord's reader (google-cloud-cpp) opens a file by asking for its last MiB,
so without this every shard over 1 MiB reads as corrupt. Everything else is the emulator's own code.
"""
from __future__ import annotations

import logging
import re
import sys
import time
from http import HTTPStatus


def _live(storage, bucket: str, name: str) -> dict | None:
    from gcp_storage_emulator.exceptions import NotFound

    try:
        return storage.get_file_obj(bucket, name)
    except NotFound:
        return None


def _upload_name(request) -> str | None:
    if request.query.get("name"):
        return request.query["name"][0]
    data = request.data
    if isinstance(data, dict):
        return (data.get("meta") if isinstance(data.get("meta"), dict) else data).get("name")
    return None


def _refused(request, storage, name: str | None, read: bool) -> HTTPStatus | None:
    """The status that the request's generation preconditions answer with, or None if they hold."""
    match, not_match = request.query.get("ifGenerationMatch"), request.query.get("ifGenerationNotMatch")
    if name is None or not (match or not_match):
        return None
    obj = _live(storage, request.params["bucket_name"], name)
    if read and obj is None:
        return None  # the handler answers 404
    generation = str(obj["generation"]) if obj else "0"
    if match and match[0] != generation:
        return HTTPStatus.PRECONDITION_FAILED
    if not_match and not_match[0] == generation:
        return HTTPStatus.NOT_MODIFIED if read else HTTPStatus.PRECONDITION_FAILED
    return None


def _with_preconditions(handler, name_of, read: bool = False):
    def wrapped(request, response, storage, *args, **kwargs):
        status = _refused(request, storage, name_of(request), read)
        if status is HTTPStatus.PRECONDITION_FAILED:
            response.status = status
            response.json({"error": {"code": 412, "message": "At least one of the pre-conditions you "
                                                             "specified did not hold.",
                                     "errors": [{"reason": "conditionNotMet"}]}})
            return None
        if status is not None:
            response.status = status
            return None
        result = handler(request, response, storage, *args, **kwargs)
        if read and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            obj = _live(storage, request.params["bucket_name"], name_of(request))
            if obj is not None and response._headers.get("Content-type") != "application/json":
                response["x-goog-generation"] = str(obj["generation"])
                response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
        return result

    return wrapped


def _with_suffix_ranges(download):
    """``download`` answering ``Range: bytes=-N`` with the last N bytes: the range is rewritten as the
    ``bytes=<start>-`` that the emulator understands."""
    def wrapped(request, response, storage, *args, **kwargs):
        suffix = re.fullmatch(r"\s*bytes=-(\d+)\s*", request.get_header("range", "") or "")
        obj = suffix and _live(storage, request.params["bucket_name"], request.params["object_id"])
        if obj:  # (a missing object: the handler answers 404)
            start = max(0, int(obj["size"]) - int(suffix[1]))
            request._request_handler.headers.replace_header("Range", f"bytes={start}-")
        return download(request, response, storage, *args, **kwargs)

    return wrapped


def add_missing_api() -> None:
    """Generation preconditions and headers, and suffix byte ranges (see the module docstring)."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    object_id = lambda r: r.params["object_id"]  # noqa: E731
    wrap = {objects.insert: _with_preconditions(objects.insert, _upload_name),
            objects.delete: _with_preconditions(objects.delete, object_id),
            objects.get: _with_preconditions(objects.get, object_id, read=True),
            objects.download: _with_preconditions(_with_suffix_ranges(objects.download), object_id, read=True)}
    objects.download = wrap[objects.download]  # objects.get(alt=media) calls it by this name
    server.HANDLERS = tuple((regex, {m: wrap.get(h, h) for m, h in methods.items()})
                            for regex, methods in server.HANDLERS)


def main(port: int, bucket: str) -> None:
    from gcp_storage_emulator.server import create_server

    logging.basicConfig(level=logging.CRITICAL)  # it logs every 404 (a lookup of a missing object) as an error
    add_missing_api()
    srv = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    srv.start()
    print("ready", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        srv.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
