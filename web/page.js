// The upload page served by ferry at `/`: drag and drop or a file picker, one row per file with
// progress, speed, time left, pause/resume/cancel, and when done the size, SHA-256 and a link.
//
// Settings come from the page's URL, then from data attributes of <main>:
//   ?endpoint=/files/        the tus endpoint (ferry fills in its --base-path as data-endpoint)
//   #token=… or ?token=…     an upload token, sent as `Authorization: Bearer`; kept for this tab
//                            only (sessionStorage) and removed from the address bar
//   ?concurrency=3 &chunkSize=8MiB &minChunkSize= &maxChunkSize= &targetChunkSeconds=
//   &retryDelay=500 &maxRetryDelay=15000 &checksum=0   tuning, see ferry-upload.js's options
//   ?protocol=tus|ietf|auto  tus 1.0 (the default) or the IETF resumable-uploads draft; auto asks
//                            the server (see ferry-upload.js)

import { FerryUploader, PROTOCOLS, formatBytes, formatDuration } from './ferry-upload.js'

const TOKEN_KEY = 'ferry-upload-token'
const main = document.getElementById('app')
const params = new URLSearchParams(location.search)
const fragment = new URLSearchParams(location.hash.slice(1))

function size(value) {
  const match = /^(\d+(?:\.\d+)?)\s*(|k|kb|kib|m|mb|mib|g|gb|gib)$/i.exec(String(value).trim())
  if (!match) return undefined
  const unit = match[2].toLowerCase()
  const factor = unit.startsWith('k') ? 1024 : unit.startsWith('m') ? 1024 ** 2 : unit.startsWith('g') ? 1024 ** 3 : 1
  return Math.round(Number(match[1]) * factor)
}

function setting(name, parse) {
  const raw = params.get(name) ?? main.dataset[name]
  if (raw === undefined || raw === null || raw === '') return undefined
  return parse(raw)
}

function takeToken() {
  const given = fragment.get('token') ?? params.get('token')
  if (given) {
    sessionStorage.setItem(TOKEN_KEY, given)
    // Out of the address bar, the history and any copied link.
    params.delete('token')
    fragment.delete('token')
    const query = params.toString()
    const hash = fragment.toString()
    history.replaceState(null, '', `${location.pathname}${query ? `?${query}` : ''}${hash ? `#${hash}` : ''}`)
    return given
  }
  return sessionStorage.getItem(TOKEN_KEY)
}

const token = takeToken()
const options = { endpoint: setting('endpoint', String) ?? '/files/', token }
for (const name of ['chunkSize', 'minChunkSize', 'maxChunkSize']) options[name] = setting(name, size)
for (const name of ['concurrency', 'retryDelay', 'maxRetryDelay', 'maxRetries', 'targetChunkSeconds', 'stallTimeout']) {
  options[name] = setting(name, Number)
}
options.checksum = setting('checksum', (v) => v !== '0' && v !== 'false')
// Like the other settings, a value the module does not know is ignored.
options.protocol = setting('protocol', (v) => (PROTOCOLS.includes(v) ? v : undefined))
for (const [key, value] of Object.entries(options)) if (value === undefined || Number.isNaN(value)) delete options[key]

const uploader = new FerryUploader(options)
document.getElementById('endpoint').textContent = uploader.endpoint

const list = document.getElementById('uploads')
const template = document.getElementById('upload-row')
const announcer = document.getElementById('announce')
const input = document.getElementById('files')
const drop = document.getElementById('drop')

function announce(text) {
  announcer.textContent = text
}

const STATUS = {
  queued: 'Waiting',
  uploading: 'Uploading',
  retrying: 'Connection trouble',
  paused: 'Paused',
  done: 'Done',
  error: 'Failed',
  aborted: 'Cancelled',
}

// The download link is one ferry signs (GET <upload URL>/link): it works as a plain link and
// carries no upload token, which would end up in proxy logs and the browser's history. It is
// valid for the server's --download-link-ttl; a click after that fetches a fresh one first.
async function signedLink(url) {
  const response = await fetch(`${url}/link`, { headers: token ? { Authorization: `Bearer ${token}` } : {} })
  if (!response.ok) throw new Error(`no download link: the server answered ${response.status}`)
  const { url: signed, expires_in: expiresIn } = await response.json()
  return { signed, lifetime: Number.isFinite(expiresIn) ? expiresIn * 1000 : 0 }
}

function offerDownload(link, url, name) {
  // Validity is counted on this clock from when the link arrived (the server's clock may differ).
  let validUntil = 0
  let fresh = false
  const refresh = async () => {
    const asked = Date.now()
    const { signed, lifetime } = await signedLink(url)
    link.href = signed
    validUntil = asked + lifetime
  }
  link.addEventListener('click', (event) => {
    if (fresh || Date.now() < validUntil - 10_000) {
      fresh = false
      return
    }
    event.preventDefault()
    refresh().then(
      () => {
        fresh = true // this one click goes through, whatever the clocks say
        link.click()
      },
      (error) => announce(`${name}: ${error.message}`),
    )
  })
  // If the first request for a signed link fails (the upload still being assembled, a network
  // hiccup), the link shows anyway and a click asks again.
  refresh()
    .catch(() => {
      link.href = url
      validUntil = 0
    })
    .finally(() => {
      link.hidden = false
    })
}

function row(upload) {
  const li = template.content.firstElementChild.cloneNode(true)
  const $ = (selector) => li.querySelector(selector)
  const name = upload.file.name || 'unnamed'
  li.dataset.name = name
  $('.upload-name').textContent = name
  $('.upload-size').textContent = formatBytes(upload.size)
  $('.upload-progress').setAttribute('aria-label', `Upload of ${name}`)
  $('.pause').setAttribute('aria-label', `Pause ${name}`)
  $('.resume').setAttribute('aria-label', `Resume ${name}`)
  $('.cancel').setAttribute('aria-label', `Cancel ${name}`)
  $('.download').setAttribute('aria-label', `Download ${name}`)

  $('.pause').addEventListener('click', () => {
    upload.pause()
    $('.resume').focus()
  })
  $('.resume').addEventListener('click', () => {
    upload.resume()
    $('.pause').focus()
  })
  $('.cancel').addEventListener('click', () => {
    upload.abort()
    input.focus()
  })

  // Sent so far; while uploading also the speed and the time left.
  let last = null
  function showStats() {
    if (!last) return
    const { bytesSent, bytesTotal, speed, eta } = last
    const parts = [`${formatBytes(bytesSent)} of ${formatBytes(bytesTotal)}`]
    if (upload.state === 'uploading' && speed > 0) {
      parts.push(`${formatBytes(speed)}/s`)
      if (eta !== null && bytesSent < bytesTotal) parts.push(`${formatDuration(eta)} left`)
    }
    $('.upload-stats').textContent = parts.join(' · ')
  }

  let lastStats = 0
  upload.addEventListener('progress', (event) => {
    const { bytesSent, bytesTotal, chunkSize } = event.detail
    last = event.detail
    const percent = bytesTotal ? (100 * bytesSent) / bytesTotal : 100
    const bar = $('.upload-progress')
    bar.value = percent
    bar.setAttribute('aria-valuetext', `${Math.floor(percent)} percent`)
    // For scripts and tests: the figures as numbers.
    li.dataset.sent = String(bytesSent)
    li.dataset.offset = String(event.detail.offset)
    li.dataset.chunkSize = String(chunkSize)
    li.dataset.url = upload.url ?? ''
    li.dataset.resumedFrom = String(upload.resumedFrom ?? '')
    // The figures change many times a second; people read them once a second at most.
    const now = performance.now()
    if (now - lastStats < 500 && bytesSent < bytesTotal) return
    lastStats = now
    showStats()
  })

  upload.addEventListener('chunksize', (event) => {
    li.dataset.chunkSize = String(event.detail.chunkSize)
  })

  upload.addEventListener('statechange', (event) => {
    const { state, message } = event.detail
    li.dataset.state = state
    li.dataset.stats = JSON.stringify(upload.stats)
    let status = STATUS[state] ?? state
    if (state === 'uploading' && upload.resumedFrom > 0) status = `Uploading (continued from ${formatBytes(upload.resumedFrom)})`
    if (state === 'retrying' && message) status = `Connection trouble: ${message}`
    $('.upload-status').textContent = status
    const active = ['queued', 'uploading', 'retrying'].includes(state)
    $('.pause').hidden = !active
    $('.resume').hidden = !(state === 'paused' || state === 'error')
    $('.resume').textContent = state === 'error' ? 'Retry' : 'Resume'
    $('.resume').setAttribute('aria-label', `${state === 'error' ? 'Retry' : 'Resume'} ${name}`)
    $('.cancel').hidden = state === 'done' || state === 'aborted'
    if (state !== 'error') $('.upload-error').hidden = true
    if (state !== 'uploading') showStats()
    if (state === 'paused') announce(`${name}: paused`)
    if (state === 'aborted') {
      announce(`${name}: cancelled`)
      $('.upload-stats').textContent = ''
      showRemembered()
    }
  })

  upload.addEventListener('error', (event) => {
    const error = $('.upload-error')
    error.textContent = event.detail.error.message
    error.hidden = false
    announce(`${name}: failed`)
  })

  upload.addEventListener('success', (event) => {
    const { url, sha256 } = event.detail
    $('.upload-stats').textContent = ''
    $('.result-size').textContent = `${formatBytes(upload.size)} (${upload.size.toLocaleString('en')} bytes)`
    $('.result-sha256').textContent = sha256 ?? 'not reported'
    $('.upload-result').hidden = false
    const link = $('.download')
    link.download = name
    offerDownload(link, url, name)
    li.dataset.url = url
    li.dataset.sha256 = sha256 ?? ''
    announce(`${name}: uploaded`)
    showRemembered()
  })

  return li
}

uploader.addEventListener('add', (event) => {
  const upload = event.detail.upload
  list.prepend(row(upload))
  showRemembered()
})

function addFiles(files) {
  const chosen = Array.from(files)
  if (chosen.length === 0) return
  uploader.addAll(chosen)
  announce(chosen.length === 1 ? `Uploading ${chosen[0].name}` : `Uploading ${chosen.length} files`)
}

input.addEventListener('change', () => {
  addFiles(input.files)
  input.value = '' // the same file can be chosen again
})

// Files dropped anywhere on the page are uploaded; the drop zone lights up meanwhile.
let depth = 0
document.addEventListener('dragenter', (event) => {
  if (!event.dataTransfer?.types.includes('Files')) return
  depth++
  drop.classList.add('dragging')
})
document.addEventListener('dragleave', () => {
  depth = Math.max(0, depth - 1)
  if (depth === 0) drop.classList.remove('dragging')
})
document.addEventListener('dragover', (event) => {
  if (event.dataTransfer?.types.includes('Files')) event.preventDefault()
})
document.addEventListener('drop', (event) => {
  if (!event.dataTransfer?.files.length) return
  event.preventDefault()
  depth = 0
  drop.classList.remove('dragging')
  addFiles(event.dataTransfer.files)
})

// Uploads an earlier visit left unfinished: choosing the same file continues them.
const resumable = document.getElementById('resumable')
const resumableList = document.getElementById('resumable-list')
function showRemembered() {
  const entries = uploader.remembered()
  resumableList.replaceChildren(
    ...entries.map((entry) => {
      const li = document.createElement('li')
      const text = document.createElement('span')
      text.textContent = `${entry.name} (${formatBytes(entry.size)})`
      const discard = document.createElement('button')
      discard.type = 'button'
      discard.className = 'button small'
      discard.textContent = 'Discard'
      discard.setAttribute('aria-label', `Discard the unfinished upload of ${entry.name}`)
      discard.addEventListener('click', async () => {
        await uploader.discard(entry)
        showRemembered()
        input.focus()
      })
      li.append(text, discard)
      return li
    }),
  )
  resumable.hidden = entries.length === 0
}
showRemembered()
main.dataset.ready = 'true'
