// ferry-upload.js: resumable browser uploads to ferry over tus 1.0 or over HTTP's own resumable
// uploads (the IETF draft, interop version 9: draft -12). No dependencies, no build step.
//
//   import { FerryUploader } from 'https://ferry.example.com/ferry-upload.js'
//   const uploader = new FerryUploader({ endpoint: 'https://ferry.example.com/files/', token })
//   const upload = uploader.add(file, { metadata: { album: '42' } })
//   upload.addEventListener('progress', (e) => console.log(e.detail.bytesSent, e.detail.bytesTotal))
//   upload.addEventListener('success', (e) => console.log(e.detail.url, e.detail.sha256))
//   upload.addEventListener('error', (e) => console.error(e.detail.error.message))
//
// What it does for each file: OPTIONS once per endpoint (checksum algorithms, Upload-Limit, and with
// `protocol: 'auto'` which protocol to speak), then either HEAD on the upload remembered for this
// file (same name, size, lastModified and endpoint, in localStorage) to resume from the server's
// offset, or POST to create one; then PATCH chunk by chunk.
// Chunks stay under the server's `Upload-Limit: max-append-size`, halve on 413 (and when a large
// chunk keeps failing while small requests get through: a proxy's 413 without CORS headers looks
// like a network error to a page), and grow while they finish quickly. Network errors, 5xx, 409,
// 423 and 429 are retried with exponential backoff and jitter after asking the server (HEAD) where
// the upload stands. Once complete, HEAD gives the whole file's SHA-256 (`Repr-Digest`).
//
// The protocol (option `protocol`) changes only the requests' fields, not any of the above:
//   'tus'   tus 1.0 (the default): `Tus-Resumable` on every request, PATCH as
//           `application/offset+octet-stream`, per-chunk `Upload-Checksum: sha256 …` when OPTIONS
//           lists sha256 in `Tus-Checksum-Algorithm`.
//   'ietf'  the draft: `Upload-Draft-Interop-Version: 9` on every request and no `Tus-Resumable`;
//           POST with `Upload-Complete: ?0`, `Upload-Length` and `Upload-Metadata` (a file that fits
//           in one chunk goes whole in the POST, with `Upload-Complete: ?1`); PATCH as
//           `application/partial-upload` with `Upload-Offset` and `Upload-Complete` (`?1` on the
//           last chunk) and per-chunk `Content-Digest: sha-256=:…:`; HEAD to resume; DELETE to
//           cancel. The largest upload comes from `Upload-Limit: max-size`.
//   'auto'  OPTIONS with `Upload-Draft-Interop-Version: 9`: 'ietf' when the answer is a success
//           whose `Upload-Limit` has `max-size` (what servers of the draft announce on OPTIONS
//           since interop version 6, and a tus-only server does not), else 'tus'. Nothing this
//           module does needs a part of tus the draft lacks (no parallel parts, no deferred length).
// ferry speaks both on the same endpoint, and an upload begun in one can be resumed in the other.
//
// docs/browser.md documents the options and events.

const TUS_VERSION = '1.0.0'
/** The draft's interop version this module speaks (draft-ietf-httpbis-resumable-upload-12). */
const INTEROP_VERSION = '9'
/** The values of the `protocol` option. */
export const PROTOCOLS = Object.freeze(['tus', 'ietf', 'auto'])
const KiB = 1024
const MiB = 1024 * KiB
const STORAGE_PREFIX = 'ferry-upload:'
/** Remembered uploads older than this are dropped (ferry expires idle uploads after 24 h by default). */
const STORAGE_MAX_AGE_MS = 7 * 24 * 3600 * 1000

/** The defaults of every option; see docs/browser.md for what each one means. */
export const DEFAULTS = Object.freeze({
  endpoint: '/files/',
  token: null,
  headers: {},
  metadata: {},
  concurrency: 3,
  chunkSize: 8 * MiB,
  minChunkSize: 256 * KiB,
  maxChunkSize: 64 * MiB,
  targetChunkSeconds: 4,
  retryDelay: 500,
  maxRetryDelay: 15000,
  maxRetries: 30,
  stallTimeout: 60000,
  checksum: true,
  resume: true,
  storage: undefined,
  protocol: 'tus',
})

/** The states of an upload, in `upload.state` and the `statechange` event. */
export const STATES = Object.freeze(['queued', 'uploading', 'retrying', 'paused', 'done', 'error', 'aborted'])

/** A header holding a non-negative integer, or null when it is missing or is not one. */
function integerHeader(reply, name) {
  const value = reply.header(name)
  if (value === null || !/^[0-9]+$/.test(value.trim())) return null
  const number = Number(value.trim())
  return Number.isSafeInteger(number) ? number : null
}

/** An error with what the user needs: a readable message, the HTTP status (0: no answer), the server's words. */
export class UploadError extends Error {
  constructor(message, { status = 0, body = '', retryable = false, cause } = {}) {
    super(message, cause ? { cause } : undefined)
    this.name = 'UploadError'
    this.status = status
    this.body = body
    this.retryable = retryable
  }
}

/** Thrown inside an upload's run when it was paused or aborted; never reaches the caller. */
class Stopped extends Error {}

// ------------------------------------------------------------------------------------------------
// Small helpers

function base64FromBytes(bytes) {
  let binary = ''
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000))
  }
  return btoa(binary)
}

function hexFromBase64(value) {
  const binary = atob(value)
  let hex = ''
  for (let i = 0; i < binary.length; i++) hex += binary.charCodeAt(i).toString(16).padStart(2, '0')
  return hex
}

/** `Upload-Metadata`: comma-separated `key base64(utf-8 value)` pairs; keys without spaces or commas. */
export function encodeMetadata(metadata) {
  const pairs = []
  for (const [key, value] of Object.entries(metadata)) {
    if (value === undefined || value === null) continue
    if (!key || /[\s,]/.test(key)) throw new UploadError(`metadata key '${key}' may contain no spaces or commas`)
    const encoded = base64FromBytes(new TextEncoder().encode(String(value)))
    pairs.push(encoded ? `${key} ${encoded}` : key)
  }
  return pairs.join(',')
}

/** The SHA-256 of a `Repr-Digest` value (`sha-256=:<base64>:`), as hex; null when absent. */
export function sha256FromReprDigest(value) {
  const match = /(?:^|,)\s*sha-256=:([A-Za-z0-9+/=]+):/.exec(value || '')
  return match ? hexFromBase64(match[1]) : null
}

/**
 * `Upload-Limit: max-size=N, max-append-size=M, ...` (a structured dictionary): its members with a
 * positive integer value, by name (`{ 'max-size': N, 'max-append-size': M }`).
 */
export function uploadLimitOf(value) {
  const limits = {}
  for (const member of (value || '').split(',')) {
    const [key, raw] = member.split('=').map((s) => s.trim())
    if (key && /^\d+$/.test(raw || '')) {
      const n = Number(raw)
      if (Number.isSafeInteger(n) && n > 0) limits[key] = n
    }
  }
  return limits
}

/** `Upload-Limit: max-append-size=N, ...`: N, or null. */
export function maxAppendSizeOf(value) {
  return uploadLimitOf(value)['max-append-size'] ?? null
}

/** 1536 -> "1.5 KiB". */
export function formatBytes(bytes) {
  if (!Number.isFinite(bytes)) return '?'
  const units = ['bytes', 'KiB', 'MiB', 'GiB', 'TiB']
  let value = bytes
  let unit = 0
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024
    unit++
  }
  return unit === 0 ? `${bytes} bytes` : `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`
}

/** 75 -> "1 min 15 s". */
export function formatDuration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return '?'
  const s = Math.round(seconds)
  if (s < 60) return `${s} s`
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`
}

function defaultStorage() {
  try {
    return globalThis.localStorage ?? null
  } catch {
    return null // blocked by the browser's settings
  }
}

/** A reply to one request, read from the XMLHttpRequest. */
class Reply {
  constructor(xhr) {
    this.status = xhr.status
    this.body = xhr.responseText || ''
    this._xhr = xhr
  }

  header(name) {
    return this._xhr.getResponseHeader(name)
  }

  /** The server's message for a refusal, in one line (a problem document's `detail` or `title`). */
  message() {
    if (/^application\/problem\+json/i.test(this.header('Content-Type') || '')) {
      try {
        const problem = JSON.parse(this.body)
        const said = problem.detail || problem.title
        if (typeof said === 'string' && said) return said.split('\n')[0].slice(0, 300)
      } catch {
        // Not JSON after all: shown as it is.
      }
    }
    return this.body.trim().split('\n')[0].slice(0, 300)
  }
}

// ------------------------------------------------------------------------------------------------
// One upload

let nextId = 1

/**
 * One file on its way to ferry. An EventTarget with events `progress`, `success`, `error` and
 * `statechange` (details in docs/browser.md). Made by `FerryUploader.add`.
 */
export class Upload extends EventTarget {
  constructor(uploader, file, options = {}) {
    super()
    this.id = nextId++
    this.file = file
    this.uploader = uploader
    this.metadata = { filename: file.name, filetype: file.type || 'application/octet-stream', ...uploader.options.metadata, ...(options.metadata || {}) }
    this.state = 'queued'
    /** The upload's URL on the server, once created (or found to resume). */
    this.url = null
    /** Bytes the server holds (its Upload-Offset). */
    this.offset = 0
    /** The offset this browser session started from (more than 0 when it resumed an earlier upload). */
    this.resumedFrom = null
    /** Bytes sent so far including the chunk in flight (for progress). */
    this.bytesSent = 0
    this.chunkSize = 0
    this.error = null
    this.result = null
    /** Counters for the curious (and the tests). */
    this.stats = { chunks: 0, bytesPatched: 0, bytesPosted: 0, retries: 0, shrinks: 0, grows: 0 }
    this._run = 0
    this._xhr = null
    this._wake = null
    this._samples = []
    this._lastProgress = 0
    this._digests = new Map()
    /** The draft's whole-file creation failed once: this upload creates empty and sends chunks. */
    this._wholeFailed = false
  }

  get size() {
    return this.file.size
  }

  /** Stops sending; `resume()` goes on from where the server is. */
  pause() {
    if (!['queued', 'uploading', 'retrying'].includes(this.state)) return
    this._stop()
    this._setState('paused')
    this.uploader._release(this)
  }

  /** Goes on after `pause()` or an error (queued behind other uploads when at the concurrency limit). */
  resume() {
    if (this.state !== 'paused' && this.state !== 'error') return
    this.error = null
    this._setState('queued')
    this.uploader._enqueue(this)
  }

  /** Cancels: stops sending, deletes the upload on the server and forgets it. */
  async abort() {
    if (this.state === 'aborted' || this.state === 'done') return
    this._stop()
    this._setState('aborted')
    this.uploader._release(this)
    this.uploader._forget(this.file)
    if (this.url) {
      try {
        await this._request('DELETE', this.url, { run: null })
      } catch {
        // Nothing more to do: ferry expires unfinished uploads on its own.
      }
    }
  }

  _stop() {
    this._run++
    if (this._xhr) this._xhr.abort()
    this._xhr = null
    if (this._wake) this._wake()
  }

  _setState(state, detail = {}) {
    if (this.state === state && !detail.message) return
    this.state = state
    this._emit('statechange', { state, ...detail })
  }

  _emit(type, detail) {
    const event = new CustomEvent(type, { detail: { upload: this, ...detail } })
    this.dispatchEvent(event)
    this.uploader._forward(type, event.detail)
  }

  /** Called by the uploader when a slot is free. */
  async _start() {
    const run = ++this._run
    this._samples = []
    this._setState('uploading')
    try {
      await this._upload(run)
    } catch (error) {
      if (error instanceof Stopped || run !== this._run) return
      this.error = error instanceof UploadError ? error : new UploadError(String(error?.message || error), { cause: error })
      this._setState('error', { message: this.error.message })
      this._emit('error', { error: this.error })
      this.uploader._release(this)
    }
  }

  _check(run) {
    if (run !== this._run) throw new Stopped()
  }

  async _upload(run) {
    const up = this.uploader
    const caps = await this._retrying(run, () => up._capabilities(this, run))
    this._check(run)
    if (caps.maxSize !== null && this.size > caps.maxSize) {
      throw new UploadError(`${this.file.name} has ${formatBytes(this.size)}; this server takes at most ${formatBytes(caps.maxSize)}`)
    }
    if (!this.chunkSize) this.chunkSize = up._startingChunkSize()

    if (!this.url) {
      const remembered = up._remembered(this.file)
      // Two files alike in name, size and date (say from two folders) must not share one upload.
      const taken = remembered && up.uploads.some((other) => other !== this && other.url === remembered.url)
      if (remembered && !taken) {
        const found = await this._retrying(run, () => this._head(remembered.url, run, true))
        this._check(run)
        if (found && found.length === this.size) {
          this.url = remembered.url
          this.offset = found.offset
          this.resumedFrom = found.offset
        } else {
          up._forget(this.file) // gone, expired, someone else's, or another file: start anew
        }
      }
    } else {
      // Resuming after pause() or an error. An upload the server no longer has (expired,
      // deleted) starts again from the beginning.
      const found = await this._retrying(run, () => this._head(this.url, run, true))
      if (found) {
        this.offset = found.offset
      } else {
        up._forget(this.file)
        this.url = null
      }
    }
    this._check(run)
    if (!this.url) {
      const created = await this._retrying(run, () => this._create(run))
      this.url = created.url
      this.offset = created.offset
      this.resumedFrom = 0
      up._remember(this.file, this.url)
    }
    this._check(run)
    this.bytesSent = this.offset
    this._progress(true)

    let failures = 0
    // A large chunk that fails without an answer while HEAD gets through: counted per size.
    let blindFailures = 0
    while (this.offset < this.size) {
      this._check(run)
      const start = this.offset
      const end = Math.min(this.size, start + this.chunkSize)
      let outcome
      try {
        outcome = await this._patch(run, start, end)
      } catch (error) {
        if (error instanceof Stopped || run !== this._run) throw new Stopped()
        if (!(error instanceof UploadError)) throw error
        if (error.status === 413) {
          this._shrink(end - start, 'the server or a proxy refused a request this large (413)')
          continue
        }
        if (!error.retryable) throw error
        failures++
        if (failures > up.options.maxRetries) {
          throw new UploadError(`gave up after ${failures} failed attempts: ${error.message}`, { status: error.status, body: error.body, cause: error })
        }
        // Where does the server stand? (Also: a network error here means the network is down.)
        await this._backoff(run, failures, error)
        const found = await this._retrying(run, () => this._head(this.url, run, false))
        this._check(run)
        if (found.offset > this.offset) {
          failures = 0
          blindFailures = 0
        } else if (error.status === 0 && end - start > up.options.minChunkSize) {
          // Small requests get through, this chunk does not, and nothing of it arrived: a proxy
          // that refuses large bodies without CORS headers looks exactly like this.
          blindFailures++
          if (blindFailures >= 2) {
            // A new guess: the next attempts start with short delays again.
            blindFailures = 0
            failures = 0
            this._shrink(end - start, 'large requests keep failing while small ones get through')
          }
        }
        this.offset = found.offset
        this.bytesSent = this.offset
        continue
      }
      failures = 0
      blindFailures = 0
      this.offset = outcome.offset
      this.bytesSent = this.offset
      this.stats.chunks++
      this._adapt(end - start, outcome.seconds)
      this._progress(true)
    }

    // Complete: the server's SHA-256 of the whole file.
    const sha256 = await this._digest(run)
    this._check(run)
    up._forget(this.file)
    this.result = { url: this.url, size: this.size, sha256, metadata: this.metadata }
    this._setState('done')
    this._emit('success', this.result)
    up._release(this)
  }

  /** Runs `attempt` until it succeeds, retrying retryable failures with backoff. */
  async _retrying(run, attempt) {
    for (let failures = 1; ; failures++) {
      this._check(run)
      try {
        return await attempt()
      } catch (error) {
        if (error instanceof Stopped || run !== this._run) throw new Stopped()
        if (!(error instanceof UploadError) || !error.retryable || failures > this.uploader.options.maxRetries) throw error
        await this._backoff(run, failures, error)
      }
    }
  }

  /** Waits before the n-th retry: exponential, capped, with jitter; a `Retry-After` is honoured. */
  async _backoff(run, failures, error) {
    const { retryDelay, maxRetryDelay } = this.uploader.options
    const exponential = Math.min(maxRetryDelay, retryDelay * 2 ** (failures - 1))
    let delay = exponential / 2 + Math.random() * (exponential / 2)
    if (error.retryAfter) delay = Math.max(delay, Math.min(maxRetryDelay, error.retryAfter * 1000))
    this.stats.retries++
    const when = delay < 1000 ? 'trying again now' : `trying again in ${formatDuration(Math.ceil(delay / 1000))}`
    this._setState('retrying', { message: `${error.message}; ${when}`, delay, error })
    // Wakes early when the browser comes back online, or when paused.
    await new Promise((resolve) => {
      const wake = () => {
        clearTimeout(timer)
        globalThis.removeEventListener?.('online', wake)
        this._wake = null
        resolve()
      }
      const timer = setTimeout(wake, delay)
      globalThis.addEventListener?.('online', wake)
      this._wake = wake
    })
    this._check(run)
    this._setState('uploading')
  }

  _shrink(failedSize, why) {
    const up = this.uploader
    const smaller = Math.max(up.options.minChunkSize, Math.floor(failedSize / 2))
    if (failedSize <= up.options.minChunkSize) {
      throw new UploadError(`${why}, even at ${formatBytes(failedSize)}; raise the proxy's body limit (nginx: client_max_body_size)`, { status: 413 })
    }
    // Somewhere between the two sizes lies the limit: stay at or below the smaller from now on
    // (every upload of this uploader), rather than keep hitting it while growing.
    up._ceiling = Math.min(up._ceiling, smaller)
    this.chunkSize = Math.min(smaller, up._chunkCap())
    this.stats.shrinks++
    this._emit('chunksize', { chunkSize: this.chunkSize, reason: why })
  }

  /** Grows the chunk while chunks finish well inside the target time; shrinks it when they take longer. */
  _adapt(sent, seconds) {
    const up = this.uploader
    const { targetChunkSeconds, minChunkSize } = up.options
    if (sent < this.chunkSize) return // the last, short chunk says little
    const cap = up._chunkCap()
    let next = this.chunkSize
    if (seconds < targetChunkSeconds / 3) next = Math.min(cap, this.chunkSize * 2)
    else if (seconds > targetChunkSeconds) next = Math.max(minChunkSize, Math.floor(this.chunkSize / 2))
    if (next !== this.chunkSize) {
      if (next > this.chunkSize) this.stats.grows++
      this.chunkSize = next
      this._emit('chunksize', { chunkSize: next, reason: `a chunk took ${seconds.toFixed(2)} s` })
    }
  }

  /** Every request's headers: the protocol's, the `headers` option's, `extra`, and the token. */
  async _headers(extra = {}, protocol = this.uploader.protocol) {
    const up = this.uploader
    const announce = protocol === 'ietf' ? { 'Upload-Draft-Interop-Version': INTEROP_VERSION } : { 'Tus-Resumable': TUS_VERSION }
    const headers = { ...announce, ...up.options.headers, ...extra }
    const token = typeof up.options.token === 'function' ? await up.options.token() : up.options.token
    if (token) headers.Authorization = `Bearer ${token}`
    return headers
  }

  /**
   * One request. Resolves with the reply for any status; rejects with a retryable UploadError
   * (status 0) when no answer came, and with Stopped when the upload was paused meanwhile.
   * `protocol` is the uploader's unless given (the OPTIONS that decides it).
   */
  async _request(method, url, { run, headers = {}, body = null, onProgress = null, protocol } = {}) {
    const all = await this._headers(headers, protocol)
    if (run !== null) this._check(run)
    const { stallTimeout } = this.uploader.options
    return await new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest()
      if (run !== null) this._xhr = xhr
      let stalled = false
      let timer = null
      const watch = () => {
        clearTimeout(timer)
        timer = setTimeout(() => {
          stalled = true
          xhr.abort()
        }, stallTimeout)
      }
      const done = () => {
        clearTimeout(timer)
        if (this._xhr === xhr) this._xhr = null
      }
      xhr.open(method, url, true)
      for (const [name, value] of Object.entries(all)) xhr.setRequestHeader(name, value)
      if (body !== null) {
        xhr.upload.onprogress = (event) => {
          watch()
          onProgress?.(event.loaded)
        }
        xhr.upload.onload = watch
      }
      xhr.onload = () => {
        done()
        resolve(new Reply(xhr))
      }
      xhr.onerror = () => {
        done()
        reject(new UploadError(`no answer from ${new URL(url).host} to ${method} (network error, or refused by a proxy)`, { retryable: true }))
      }
      xhr.onabort = () => {
        done()
        if (stalled) reject(new UploadError(`${method} stalled: nothing moved for ${formatDuration(stallTimeout / 1000)}`, { retryable: true }))
        else reject(new Stopped())
      }
      watch()
      xhr.send(body)
    })
  }

  /** An error for a reply that was not what was hoped for. */
  _refusal(what, reply) {
    const status = reply.status
    const said = reply.message()
    const retryable = status >= 500 || status === 409 || status === 423 || status === 429 || status === 460
    let message
    if (status === 401) message = `not allowed to upload: ${said || 'an upload token is required'}`
    else if (status === 404 || status === 410) message = `the upload no longer exists on the server (${status}${said ? `: ${said}` : ''})`
    else if (status === 460) message = 'a chunk arrived damaged (checksum mismatch)'
    else message = `${what} failed with ${status}${said ? `: ${said}` : ''}`
    const error = new UploadError(message, { status, body: reply.body, retryable })
    const retryAfter = Number(reply.header('Retry-After'))
    if (Number.isFinite(retryAfter) && retryAfter > 0) error.retryAfter = retryAfter
    return error
  }

  /** HEAD: the server's offset and length; null for a remembered upload that is gone. */
  async _head(url, run, remembered) {
    const reply = await this._request('HEAD', url, { run })
    if (reply.status === 200 || reply.status === 204) {
      const offset = integerHeader(reply, 'Upload-Offset')
      if (offset === null) throw new UploadError(`HEAD ${url} answered without an Upload-Offset`)
      const length = reply.header('Upload-Length')
      this.uploader._learnLimit(reply)
      return { offset, length: length === null ? null : Number(length), reply }
    }
    if (remembered && [403, 404, 410].includes(reply.status)) return null
    throw this._refusal('asking the server for the upload', reply)
  }

  /** POST: a new upload; resolves with its URL and the offset the server holds (0 unless the file went along). */
  async _create(run) {
    const up = this.uploader
    const headers = { 'Upload-Length': String(this.size), 'Upload-Metadata': encodeMetadata(this.metadata) }
    if (up.protocol === 'ietf') {
      if (this.size <= this.chunkSize && !this._wholeFailed) {
        try {
          return await this._createWhole(run, headers)
        } catch (error) {
          if (error instanceof Stopped || run !== this._run) throw new Stopped()
          if (!(error instanceof UploadError) || (error.status !== 0 && error.status !== 413)) throw error
          // Too large for a proxy (a 413, or no answer at all, which is how a proxy's 413 looks
          // to a page on another origin), or the network: from now on the file goes the long way,
          // an empty creation and then chunks, which the loop that sends them knows how to shrink.
          this._wholeFailed = true
          if (error.status === 413) this._shrink(this.size, 'the server or a proxy refused a request this large (413)')
        }
      }
      headers['Upload-Complete'] = '?0'
    }
    const reply = await this._request('POST', up.endpoint, { run, headers })
    if (reply.status !== 201) throw this._refusal('creating the upload', reply)
    return { url: this._createdAt(reply), offset: 0 }
  }

  /**
   * The draft's creation with the whole file in it (`Upload-Complete: ?1`): one request for a file
   * that fits in one chunk. Any 2xx means the server took all of it.
   */
  async _createWhole(run, headers) {
    const up = this.uploader
    const all = { ...headers, 'Upload-Complete': '?1' }
    if (up._checksums) {
      all['Content-Digest'] = `sha-256=:${await this._checksum(0, this.size)}:`
      this._check(run)
    }
    const reply = await this._request('POST', up.endpoint, {
      run,
      headers: all,
      body: this.file,
      onProgress: (loaded) => {
        this.bytesSent = Math.min(loaded, this.size)
        this._progress(false)
      },
    })
    if (reply.status < 200 || reply.status >= 300) throw this._refusal('uploading the file', reply)
    const url = this._createdAt(reply)
    this.stats.bytesPosted += this.size
    return { url, offset: integerHeader(reply, 'Upload-Offset') ?? this.size }
  }

  /** The new upload's URL, from the creation's `Location`. */
  _createdAt(reply) {
    const location = reply.header('Location')
    if (!location) throw new UploadError('the server created the upload but did not say where (no Location; cross-origin servers must expose it)')
    this.uploader._learnLimit(reply)
    return new URL(location, this.uploader.endpoint).href
  }

  /** PATCH one chunk [start, end): resolves with the new offset and how long it took. */
  async _patch(run, start, end) {
    const up = this.uploader
    const ietf = up.protocol === 'ietf'
    const headers = { 'Upload-Offset': String(start) }
    if (ietf) {
      headers['Content-Type'] = 'application/partial-upload'
      headers['Upload-Complete'] = end === this.size ? '?1' : '?0'
    } else {
      headers['Content-Type'] = 'application/offset+octet-stream'
    }
    if (up._checksums) {
      const digest = await this._checksum(start, end)
      if (ietf) headers['Content-Digest'] = `sha-256=:${digest}:`
      else headers['Upload-Checksum'] = `sha256 ${digest}`
      this._check(run)
      // The next chunk's digest is worked out while this one travels.
      const next = Math.min(this.size, end + this.chunkSize)
      if (next > end) this._checksum(end, next).catch(() => {})
    }
    const began = performance.now()
    const reply = await this._request('PATCH', this.url, {
      run,
      headers,
      // The file's own slice, not the bytes read for the digest: Chromium sends a file-backed
      // body many times faster than an ArrayBuffer of the same size.
      body: this.file.slice(start, end),
      onProgress: (loaded) => {
        this.bytesSent = start + Math.min(loaded, end - start)
        this._progress(false)
      },
    })
    const seconds = (performance.now() - began) / 1000
    // tus answers 204; the draft any 2xx (201 in its early versions, 200 once complete), and a
    // success means the whole chunk was appended, so the draft's answer need not say the offset.
    const accepted = ietf ? reply.status >= 200 && reply.status < 300 : reply.status === 204 || reply.status === 200
    if (accepted) {
      const offset = integerHeader(reply, 'Upload-Offset') ?? (ietf && reply.header('Upload-Offset') === null ? end : null)
      if (offset === null || offset > this.size) throw new UploadError('the server answered a PATCH without a valid Upload-Offset')
      // Nothing kept (an intermediary lost the body?): a failure like any other, not a success
      // that sends the same chunk again at once, for ever.
      if (offset <= start) throw new UploadError(`the server kept none of bytes ${start}-${end}`, { status: reply.status, retryable: true })
      this.stats.bytesPatched += offset - start
      up._learnLimit(reply)
      return { offset, seconds }
    }
    throw this._refusal(`sending bytes ${start}-${end}`, reply)
  }

  /** The base64 SHA-256 of bytes [start, end) of the file (remembered for the chunk after this one). */
  _checksum(start, end) {
    const key = `${start}-${end}`
    let digest = this._digests.get(key)
    if (!digest) {
      digest = this.file
        .slice(start, end)
        .arrayBuffer()
        .then((bytes) => crypto.subtle.digest('SHA-256', bytes))
        .then((sum) => base64FromBytes(new Uint8Array(sum)))
      for (const old of this._digests.keys()) if (Number(old.split('-')[0]) < start) this._digests.delete(old)
      this._digests.set(key, digest)
    }
    return digest
  }

  /** After the last chunk: HEAD until the server reports the whole file's SHA-256 (briefly, then without it). */
  async _digest(run) {
    for (let attempt = 0; attempt < 10; attempt++) {
      const found = await this._retrying(run, () => this._head(this.url, run, false))
      const sha256 = sha256FromReprDigest(found.reply.header('Repr-Digest'))
      if (found.offset < this.size) {
        // Never report an upload done that the server does not hold whole.
        throw new UploadError(`the server holds ${found.offset} of ${this.size} bytes after the last chunk; retry to resume`)
      }
      if (sha256) return sha256
      // Object stores finish assembling a moment after the last PATCH.
      await new Promise((resolve) => setTimeout(resolve, 250 * (attempt + 1)))
      this._check(run)
    }
    return null
  }

  /** Emits `progress`: at most every 100 ms while a chunk is on its way, always when `force`. */
  _progress(force) {
    const now = performance.now()
    const samples = this._samples
    samples.push([now, this.bytesSent])
    while (samples.length > 2 && now - samples[0][0] > 5000) samples.shift()
    if (!force && now - this._lastProgress < 100) return
    this._lastProgress = now
    const [t0, b0] = samples[0]
    const speed = now > t0 ? ((this.bytesSent - b0) * 1000) / (now - t0) : 0
    const remaining = this.size - this.bytesSent
    this._emit('progress', {
      bytesSent: this.bytesSent,
      bytesTotal: this.size,
      offset: this.offset,
      speed,
      eta: speed > 0 ? remaining / speed : null,
      chunkSize: this.chunkSize,
    })
  }
}

// ------------------------------------------------------------------------------------------------
// The uploader: shared settings, what the server supports, the queue

/**
 * Uploads files to one ferry endpoint, `concurrency` at a time. An EventTarget: every upload's
 * events are also dispatched here (with `detail.upload`), plus `add` when a file is added.
 */
export class FerryUploader extends EventTarget {
  constructor(options = {}) {
    super()
    this.options = { ...DEFAULTS, ...options }
    if (!PROTOCOLS.includes(this.options.protocol)) {
      throw new RangeError(`protocol must be one of ${PROTOCOLS.join(', ')}, not ${this.options.protocol}`)
    }
    /** The protocol in use: 'tus' or 'ietf'; with `protocol: 'auto'`, null until OPTIONS has answered. */
    this.protocol = this.options.protocol === 'auto' ? null : this.options.protocol
    if (this.options.storage === undefined) this.options.storage = defaultStorage()
    const base = globalThis.document?.baseURI ?? globalThis.location?.href
    this.endpoint = new URL(this.options.endpoint, base).href
    this.uploads = []
    this._queue = []
    this._active = new Set()
    this._caps = null
    this._capsPromise = null
    this._checksums = false
    /** The server's advertised `max-append-size`, when it sends one. */
    this.maxAppendSize = null
    /** Chunks twice this size failed (413, or kept failing): no upload goes above it again. */
    this._ceiling = Infinity
  }

  /** Adds a file (a File or Blob with a name) and starts it as soon as a slot is free. */
  add(file, options = {}) {
    const upload = new Upload(this, file, options)
    this.uploads.push(upload)
    this.dispatchEvent(new CustomEvent('add', { detail: { upload } }))
    this._enqueue(upload)
    return upload
  }

  /** Adds several files; returns their uploads. */
  addAll(files, options = {}) {
    return Array.from(files, (file) => this.add(file, options))
  }

  pauseAll() {
    for (const upload of this.uploads) upload.pause()
  }

  resumeAll() {
    for (const upload of this.uploads) upload.resume()
  }

  /**
   * Unfinished uploads this browser remembers for this endpoint (from earlier visits): choose the
   * same file again and it continues. `[{ name, size, lastModified, url, createdAt }]`
   */
  remembered() {
    const storage = this.options.storage
    if (!storage || !this.options.resume) return []
    const found = []
    for (let i = 0; i < storage.length; i++) {
      const key = storage.key(i)
      if (!key?.startsWith(STORAGE_PREFIX)) continue
      try {
        const [endpoint, name, size, lastModified] = JSON.parse(key.slice(STORAGE_PREFIX.length))
        const entry = JSON.parse(storage.getItem(key))
        if (endpoint !== this.endpoint) continue
        if (Date.now() - entry.createdAt > STORAGE_MAX_AGE_MS) continue
        const active = this.uploads.some((u) => u.url === entry.url && !['done', 'aborted'].includes(u.state))
        if (!active) found.push({ name, size, lastModified, url: entry.url, createdAt: entry.createdAt })
      } catch {
        // Not ours after all.
      }
    }
    return found.sort((a, b) => b.createdAt - a.createdAt)
  }

  /** Forgets a remembered upload (from `remembered()`) and deletes it on the server. */
  async discard(entry) {
    this.options.storage?.removeItem(this._key(entry))
    const upload = new Upload(this, { name: entry.name, size: entry.size, type: '' })
    try {
      // The DELETE goes in the protocol the server is spoken to in.
      if (!this.protocol) await this._capabilities(upload, upload._run)
      await upload._request('DELETE', entry.url, { run: null })
    } catch {
      // It expires on its own.
    }
  }

  _forward(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }))
  }

  _enqueue(upload) {
    if (!this._queue.includes(upload)) this._queue.push(upload)
    this._pump()
  }

  _release(upload) {
    this._active.delete(upload)
    this._queue = this._queue.filter((u) => u !== upload)
    this._pump()
  }

  _pump() {
    const limit = Math.max(1, this.options.concurrency)
    while (this._active.size < limit && this._queue.length > 0) {
      const upload = this._queue.shift()
      if (upload.state !== 'queued') continue
      this._active.add(upload)
      upload._start()
    }
  }

  /**
   * OPTIONS once per uploader (shared by concurrent uploads; retried like any request): what the
   * server supports, and with `protocol: 'auto'` which protocol to speak.
   */
  async _capabilities(upload, run) {
    if (this._caps) return this._caps
    if (!this._capsPromise) {
      this._capsPromise = (async () => {
        // Asked in the draft's terms unless tus was chosen: a server of the draft then answers
        // with its Upload-Limit (ferry adds its tus fields either way).
        const asking = this.options.protocol === 'tus' ? 'tus' : 'ietf'
        const reply = await upload._request('OPTIONS', this.endpoint, { run: null, protocol: asking })
        if (reply.status >= 500) throw upload._refusal('asking the server what it supports', reply)
        const ok = reply.status >= 200 && reply.status < 300
        const limits = uploadLimitOf(reply.header('Upload-Limit'))
        if (this.options.protocol === 'auto') this.protocol = ok && limits['max-size'] ? 'ietf' : 'tus'
        const algorithms = (reply.header('Tus-Checksum-Algorithm') || '').toLowerCase().split(',').map((s) => s.trim())
        // tus: the algorithms OPTIONS lists. The draft: Content-Digest, which RFC 9530 lets a
        // server ignore, so it is sent whenever Web Crypto can compute it.
        const digests = this.protocol === 'ietf' || algorithms.includes('sha256')
        this._checksums = Boolean(this.options.checksum && digests && globalThis.crypto?.subtle)
        const tusMaxSize = Number(reply.header('Tus-Max-Size'))
        let maxSize = Number.isSafeInteger(tusMaxSize) && tusMaxSize > 0 ? tusMaxSize : null
        if (this.protocol === 'ietf' && limits['max-size']) maxSize = limits['max-size']
        this._learnLimit(reply)
        this._caps = { algorithms, maxSize, status: reply.status, protocol: this.protocol }
        return this._caps
      })().finally(() => {
        this._capsPromise = null
      })
    }
    const caps = await this._capsPromise
    upload._check(run)
    return caps
  }

  _learnLimit(reply) {
    const limit = maxAppendSizeOf(reply.header('Upload-Limit'))
    if (limit === null || limit === this.maxAppendSize) return
    this.maxAppendSize = limit
    for (const upload of this.uploads) if (upload.chunkSize) upload.chunkSize = Math.min(upload.chunkSize, this._chunkCap())
  }

  _chunkCap() {
    const { maxChunkSize, minChunkSize } = this.options
    return Math.max(minChunkSize, Math.min(maxChunkSize, this.maxAppendSize ?? Infinity, this._ceiling))
  }

  _startingChunkSize() {
    return Math.max(this.options.minChunkSize, Math.min(this.options.chunkSize, this._chunkCap()))
  }

  _key(file) {
    return STORAGE_PREFIX + JSON.stringify([this.endpoint, file.name, file.size, file.lastModified ?? null])
  }

  _remembered(file) {
    if (!this.options.resume || !this.options.storage) return null
    try {
      const entry = JSON.parse(this.options.storage.getItem(this._key(file)))
      if (entry?.url && Date.now() - entry.createdAt < STORAGE_MAX_AGE_MS) return entry
    } catch {
      // Unreadable: start anew.
    }
    return null
  }

  _remember(file, url) {
    if (!this.options.resume || !this.options.storage) return
    try {
      this.options.storage.setItem(this._key(file), JSON.stringify({ url, createdAt: Date.now() }))
    } catch {
      // Storage full or blocked: the upload works, it just cannot be resumed after a reload.
    }
  }

  _forget(file) {
    try {
      this.options.storage?.removeItem(this._key(file))
    } catch {
      // Nothing to forget.
    }
  }
}

/** Uploads one file with a fresh uploader: `upload(file, { endpoint, token })`. */
export function upload(file, options = {}) {
  return new FerryUploader(options).add(file, options)
}
