#!/usr/bin/env python3
"""Uploads one file to a tus server with tuspy (the tus project's Python client).

Driven by ferry's integration tests (tests/api/clients.rs), but usable by hand too:

    python3 tuspy_upload.py --endpoint http://127.0.0.1:8080/files/ --file big.bin \
        --chunk-size 524288 --filename big.bin

Resuming, the way an application built on tuspy would do it:

  * ``--storage FILE`` keeps the upload URL in tuspy's URL storage (a TinyDB file), keyed by
    tuspy's fingerprint of the file. A later run with the same storage finds the URL, asks the
    server for the offset (HEAD) and goes on from there.
  * ``--url URL`` hands tuspy the URL of an upload that already exists.
  * ``--stop-after-chunks N`` stops after N chunks and exits at once without any clean-up,
    as a crashed process would.

``--chunk-size auto`` asks the server first (OPTIONS) and uses the ``max-append-size`` of its
``Upload-Limit`` answer: the largest body the proxies in front let through.

Prints ``key=value`` lines describing the run, then the upload URL as the last line:
``start_offset`` (where this run began), ``chunks`` and ``sent`` (PATCH requests and bytes this
run), ``offset`` (where the upload stands), ``complete`` and ``chunk_size``.
"""

import argparse
import asyncio
import os
import sys

import requests
from tusclient import client
from tusclient.storage import filestorage


def chunk_size(value):
    """A number of bytes, or None for 'auto'."""
    return None if value == "auto" else int(value)


def advertised_chunk_size(endpoint):
    """The max-append-size of the server's Upload-Limit (OPTIONS on the endpoint)."""
    response = requests.options(endpoint, headers={"Tus-Resumable": "1.0.0"}, timeout=30)
    response.raise_for_status()
    limit = response.headers.get("Upload-Limit")
    if not limit:
        sys.exit(f"tuspy_upload: --chunk-size auto, but OPTIONS {endpoint} sent no Upload-Limit")
    # A structured-field dictionary: key=value pairs separated by commas.
    for item in limit.split(","):
        key, _, value = item.strip().partition("=")
        if key == "max-append-size":
            return int(value)
    sys.exit(f"tuspy_upload: no max-append-size in Upload-Limit: {limit}")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", required=True, help="the tus creation URL, e.g. http://host/files/")
    parser.add_argument("--file", required=True, help="the file to upload")
    parser.add_argument("--chunk-size", type=chunk_size, required=True,
                        help="bytes per PATCH request, or 'auto' for the server's Upload-Limit max-append-size")
    parser.add_argument("--filename", help="sent as the 'filename' metadata value")
    parser.add_argument("--storage", help="a TinyDB file for tuspy's URL storage (enables resuming)")
    parser.add_argument("--url", help="resume this upload URL instead of creating an upload")
    parser.add_argument("--stop-after-chunks", type=int, help="exit abruptly after this many chunks")
    parser.add_argument("--checksum", action="store_true", help="send Upload-Checksum (sha1) with each chunk")
    parser.add_argument("--async", dest="use_async", action="store_true", help="use tuspy's asyncio uploader")
    args = parser.parse_args()
    if args.chunk_size is None:
        args.chunk_size = advertised_chunk_size(args.endpoint)
    if args.chunk_size <= 0:
        parser.error("--chunk-size must be positive")
    if args.stop_after_chunks is not None and args.stop_after_chunks <= 0:
        parser.error("--stop-after-chunks must be positive")
    return args


def make_uploader(args):
    tus = client.TusClient(args.endpoint)
    options = {
        "file_path": args.file,
        "chunk_size": args.chunk_size,
        "metadata": {"filename": args.filename} if args.filename else {},
        "upload_checksum": args.checksum,
    }
    if args.url:
        options["url"] = args.url
    if args.storage:
        options["store_url"] = True
        options["url_storage"] = filestorage.FileStorage(args.storage)
    # Constructing the uploader looks up a stored or given URL and, if there is one, asks the
    # server for its offset.
    if args.use_async:
        return tus.async_uploader(**options)
    return tus.uploader(**options)


def report(uploader, size, start_offset, chunks, sent):
    print(f"start_offset={start_offset}")
    print(f"chunks={chunks}")
    print(f"sent={sent}")
    print(f"offset={uploader.offset}")
    print(f"complete={'true' if uploader.offset == size else 'false'}")
    print(f"chunk_size={uploader.chunk_size}")
    print(uploader.url)
    sys.stdout.flush()


async def upload_chunk(uploader, use_async):
    if use_async:
        await uploader.upload_chunk()
    else:
        uploader.upload_chunk()


async def run(args):
    size = os.path.getsize(args.file)
    uploader = make_uploader(args)
    start_offset = uploader.offset if uploader.url else 0
    print(f"tuspy: {'resuming ' + uploader.url if uploader.url else 'new upload'} at offset {start_offset}",
          file=sys.stderr)

    chunks = 0
    sent = 0
    # Every chunk goes through upload_chunk (which also creates the upload when there is no URL
    # yet), so that this run can count what it sent.
    while uploader.url is None or uploader.offset < size:
        before = uploader.offset if uploader.url else 0
        await upload_chunk(uploader, args.use_async)
        chunks += 1
        sent += uploader.offset - before
        if args.stop_after_chunks is not None and chunks >= args.stop_after_chunks and uploader.offset < size:
            report(uploader, size, start_offset, chunks, sent)
            # A crash: no clean-up, no goodbye to the server.
            os._exit(0)

    report(uploader, size, start_offset, chunks, sent)


def main():
    args = parse_args()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
