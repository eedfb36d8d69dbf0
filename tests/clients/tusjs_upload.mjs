// Uploads one file to a tus server with tus-js-client (the tus project's JavaScript client) in Node.js.
//
// Driven by ferry's integration tests (tests/api/clients.rs), but usable by hand too:
//
//   node tusjs_upload.mjs --endpoint http://127.0.0.1:8080/files/ --file big.bin \
//       --chunk-size 524288 --filename big.bin
//
// Options beyond the basics, each switching on one way a real application uses the client:
//   --protocol P                tus (the default), or one of the IETF resumable-uploads drafts
//                               tus-js-client speaks: ietf-draft-03 (Upload-Draft-Interop-Version
//                               5) or ietf-draft-05 (version 6); passed as its protocol option
//   --storage FILE              keep upload URLs in tus-js-client's FileUrlStorage and, before
//                               starting, look for a previous upload of the same file there
//                               (findPreviousUploads + resumeFromPreviousUpload)
//   --url URL                   resume this upload URL (the uploadUrl option)
//   --abort-after-chunks N      call upload.abort() once N chunks were accepted, then exit
//   --abort-mid-request BYTES   call upload.abort() while a PATCH body is on its way, as soon as
//                               more than BYTES of the file were sent, then exit
//   --parallel N                parallelUploads: N partial uploads, concatenated by the server
//   --stream                    upload from a plain Readable stream with a deferred length
//   --data-during-creation      send the first chunk with the POST (creation-with-upload)
//   --override-patch            send PATCH as POST + X-HTTP-Method-Override
//   --retry-delays a,b,c        retryDelays in ms (default: none, so any error fails the run)
//
// --chunk-size auto asks the server first (OPTIONS, in the protocol of the run) and uses the
// max-append-size of its Upload-Limit answer: the largest body the proxies in front let through.
//
// Prints key=value lines describing the run, then the upload URL as the last line:
//   start_offset  where this run began (the offset HEAD reported when resuming, else 0)
//   resumed_from  the URL found in the URL storage, if any
//   sent          bytes the server accepted during this run (from the Upload-Offset answers)
//   posts, patches, heads   requests this run made
//   post_offset   Upload-Offset of the creation response (creation-with-upload), if any
//   partial       one line per partial upload URL, in the order they were created (parallel uploads)
//   final_concat  the Upload-Concat header the client sent to create the final upload
//   retries       how many times the client decided to retry
//   aborted       whether this run stopped on purpose before the end
//   complete      whether the client reported success
//   chunk_size    the chunk size used
//   protocol      the protocol option given to tus-js-client
//   answer        one line per response: method, status and Upload-Complete (- when absent)
//   tus_answers   how many responses carried Tus-Resumable (none, when the server took the run
//                 for the IETF draft)

import { createReadStream } from 'node:fs'
import { PassThrough } from 'node:stream'
import { parseArgs } from 'node:util'

import { FileUrlStorage, Upload, enableDebugLog } from 'tus-js-client'

// TUSJS_DEBUG=1 shows tus-js-client's own log on stderr.
if (process.env.TUSJS_DEBUG) enableDebugLog()

const { values: args } = parseArgs({
  options: {
    endpoint: { type: 'string' },
    file: { type: 'string' },
    'chunk-size': { type: 'string' },
    filename: { type: 'string' },
    storage: { type: 'string' },
    url: { type: 'string' },
    'abort-after-chunks': { type: 'string' },
    'abort-mid-request': { type: 'string' },
    parallel: { type: 'string' },
    stream: { type: 'boolean', default: false },
    'data-during-creation': { type: 'boolean', default: false },
    'override-patch': { type: 'boolean', default: false },
    'retry-delays': { type: 'string' },
    protocol: { type: 'string', default: 'tus' },
  },
  strict: true,
})

function fail(message) {
  process.stderr.write(`tusjs_upload: ${message}\n`)
  process.exit(2)
}

function positive(name) {
  if (args[name] === undefined) return null
  const n = Number(args[name])
  if (!Number.isSafeInteger(n) || n <= 0) fail(`--${name} must be a positive integer`)
  return n
}

// tus-js-client's name for each protocol, and the header that announces it (as tus-js-client
// sends it on every request).
const PROTOCOLS = {
  tus: { option: 'tus-v1', headers: { 'Tus-Resumable': '1.0.0' } },
  'ietf-draft-03': { option: 'ietf-draft-03', headers: { 'Upload-Draft-Interop-Version': '5' } },
  'ietf-draft-05': { option: 'ietf-draft-05', headers: { 'Upload-Draft-Interop-Version': '6' } },
}
const protocol = PROTOCOLS[args.protocol] ?? fail(`--protocol must be one of ${Object.keys(PROTOCOLS).join(', ')}`)

// The max-append-size of the server's Upload-Limit (a structured-field dictionary of key=value).
async function advertisedChunkSize(endpoint) {
  const res = await fetch(endpoint, { method: 'OPTIONS', headers: protocol.headers })
  if (!res.ok) fail(`OPTIONS ${endpoint}: ${res.status}`)
  const limit = res.headers.get('Upload-Limit')
  if (!limit) fail(`--chunk-size auto, but OPTIONS ${endpoint} sent no Upload-Limit`)
  for (const item of limit.split(',')) {
    const [key, value] = item.trim().split('=')
    if (key === 'max-append-size') return Number.parseInt(value, 10)
  }
  fail(`no max-append-size in Upload-Limit: ${limit}`)
}

if (!args.endpoint || !args.file || !args['chunk-size']) {
  fail('--endpoint, --file and --chunk-size are required')
}
const chunkSize = args['chunk-size'] === 'auto' ? await advertisedChunkSize(args.endpoint) : positive('chunk-size')
const abortAfterChunks = positive('abort-after-chunks')
const abortMidRequest = positive('abort-mid-request')
const parallel = positive('parallel')

const stats = {
  start_offset: 0,
  resumed_from: null,
  sent: 0,
  posts: 0,
  patches: 0,
  heads: 0,
  post_offset: null,
  partials: [],
  final_concat: null,
  retries: 0,
  aborted: false,
  answers: [],
  tus_answers: 0,
}

function report(url, complete) {
  const lines = [
    `start_offset=${stats.start_offset}`,
    ...(stats.resumed_from ? [`resumed_from=${stats.resumed_from}`] : []),
    `sent=${stats.sent}`,
    `posts=${stats.posts}`,
    `patches=${stats.patches}`,
    `heads=${stats.heads}`,
    ...(stats.post_offset !== null ? [`post_offset=${stats.post_offset}`] : []),
    ...stats.partials.map((p) => `partial=${p}`),
    ...(stats.final_concat !== null ? [`final_concat=${stats.final_concat}`] : []),
    `retries=${stats.retries}`,
    `aborted=${stats.aborted}`,
    `complete=${complete}`,
    `chunk_size=${chunkSize}`,
    `protocol=${protocol.option}`,
    ...stats.answers.map((a) => `answer=${a}`),
    `tus_answers=${stats.tus_answers}`,
    url ?? '',
  ]
  // Writes to a pipe are synchronous in Node.js on Linux, so exiting right after is safe.
  process.stdout.write(`${lines.join('\n')}\n`)
}

function offsetOf(res) {
  const value = res.getHeader('Upload-Offset')
  return value === undefined ? null : Number.parseInt(value, 10)
}

// The input: a file stream (which tus-js-client slices by path and fingerprints for the URL
// storage) or, with --stream, a plain Readable whose length nobody knows in advance.
const input = args.stream ? createReadStream(args.file).pipe(new PassThrough()) : createReadStream(args.file)

let upload = null
let chunksAccepted = 0
let aborting = false
let finished = false

// tus-js-client can end up waiting on a promise that never settles (for instance
// tus/tus-js-client#779: a deferred-length stream whose size is a multiple of chunkSize); Node.js
// then simply exits with status 0. Make that a failure instead.
process.on('beforeExit', () => {
  if (!finished && !aborting) fail('the upload stopped without reporting success or an error')
})

function abortAndExit() {
  if (aborting) return
  aborting = true
  stats.aborted = true
  // abort() ends the request in flight (if any) and stops the upload; the URL stays resumable.
  upload.abort().then(
    () => {
      report(upload.url, false)
      process.exit(0)
    },
    (err) => fail(`abort failed: ${err}`),
  )
}

const options = {
  endpoint: args.endpoint,
  protocol: protocol.option,
  chunkSize,
  metadata: args.filename ? { filename: args.filename } : {},
  retryDelays: args['retry-delays'] ? args['retry-delays'].split(',').map(Number) : null,
  uploadDataDuringCreation: args['data-during-creation'],
  overridePatchMethod: args['override-patch'],
  uploadLengthDeferred: args.stream,
  onBeforeRequest(req) {
    const method = req.getHeader('X-HTTP-Method-Override') ?? req.getMethod()
    if (method === 'HEAD') stats.heads += 1
    else if (method === 'PATCH') stats.patches += 1
    else if (method === 'POST') stats.posts += 1
    const concat = req.getHeader('Upload-Concat')
    if (method === 'POST' && concat?.startsWith('final;')) stats.final_concat = concat
  },
  onAfterResponse(req, res) {
    const method = req.getHeader('X-HTTP-Method-Override') ?? req.getMethod()
    const status = res.getStatus()
    const offset = offsetOf(res)
    stats.answers.push(`${method} ${status} ${res.getHeader('Upload-Complete') ?? '-'}`)
    if (res.getHeader('Tus-Resumable') !== undefined) stats.tus_answers += 1
    if (method === 'HEAD' && status < 300 && offset !== null) {
      stats.start_offset = offset
    } else if (method === 'PATCH' && status < 300 && offset !== null) {
      stats.sent += offset - Number.parseInt(req.getHeader('Upload-Offset'), 10)
    } else if (method === 'POST' && status < 300) {
      if (req.getHeader('Upload-Concat') === 'partial') {
        stats.partials.push(new URL(res.getHeader('Location'), args.endpoint).toString())
      }
      // A final upload's 201 reports the concatenated length: those bytes came in the partials.
      const final = req.getHeader('Upload-Concat')?.startsWith('final;')
      if (offset !== null && offset > 0 && !final) {
        stats.post_offset = offset
        stats.sent += offset
      }
    }
  },
  onShouldRetry(err, attempt) {
    stats.retries += 1
    const status = err.originalResponse ? err.originalResponse.getStatus() : 0
    process.stderr.write(`tusjs_upload: retry ${attempt + 1} after: ${err.message}\n`)
    return status < 400 || status >= 500 || status === 409 || status === 423
  },
  onChunkComplete() {
    chunksAccepted += 1
    if (abortAfterChunks !== null && chunksAccepted >= abortAfterChunks) abortAndExit()
  },
  onProgress(bytesSent) {
    if (abortMidRequest !== null && bytesSent > abortMidRequest) abortAndExit()
  },
  onSuccess() {
    if (aborting) return
    finished = true
    report(upload.url, true)
  },
  onError(err) {
    fail(`upload failed: ${err.stack ?? err}`)
  },
}
if (parallel !== null) options.parallelUploads = parallel
if (args.url) options.uploadUrl = args.url
if (args.storage) options.urlStorage = new FileUrlStorage(args.storage)

upload = new Upload(input, options)

if (args.storage) {
  const previous = await upload.findPreviousUploads()
  if (previous.length > 0) {
    // The most recent entry for this file.
    previous.sort((a, b) => Date.parse(b.creationTime) - Date.parse(a.creationTime))
    stats.resumed_from = previous[0].uploadUrl
    upload.resumeFromPreviousUpload(previous[0])
  }
}
upload.start()
