// What the browser scripts share: launching Debian's Chromium headless, waiting, gating requests,
// and reporting. Each script prints one JSON object on its last line of stdout; the Rust tests
// (tests/api/browser.rs) read it and check the server's side.

import { chromium } from 'playwright-core'

export const CHROMIUM = process.env.FERRY_TEST_CHROMIUM || '/usr/bin/chromium'

export function fail(message) {
  process.stderr.write(`${process.argv[1]}: ${message}\n`)
  process.exit(2)
}

/** A fresh headless Chromium (playwright gives it a new, empty profile each time). */
export async function launch() {
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  })
}

/** A new page whose console errors and failed page loads go to stderr (shown when a test fails). */
export async function newPage(browser, contextOptions = {}) {
  const context = await browser.newContext(contextOptions)
  const page = await context.newPage()
  page.on('console', (msg) => {
    if (msg.type() === 'error' || msg.type() === 'warning') process.stderr.write(`console.${msg.type()}: ${msg.text()}\n`)
  })
  page.on('pageerror', (error) => process.stderr.write(`page error: ${error.stack || error}\n`))
  return page
}

/** Prints the result for the Rust side and exits. */
export function report(result) {
  process.stdout.write(`${JSON.stringify(result)}\n`)
}

/**
 * Runs `main(browser)` with a browser that is closed however it ends, and a deadline after which
 * the script fails rather than hangs.
 */
export async function withBrowser(main, { limitMs = 90000 } = {}) {
  const browser = await launch()
  const timer = setTimeout(() => {
    process.stderr.write(`gave up after ${limitMs} ms\n`)
    browser.close().finally(() => process.exit(3))
  }, limitMs)
  try {
    report(await main(browser))
  } catch (error) {
    process.stderr.write(`${error.stack || error}\n`)
    process.exitCode = 1
  } finally {
    clearTimeout(timer)
    await browser.close()
  }
}

/** Polls `check` (async) until it returns a truthy value, which is returned; throws after `limitMs`. */
export async function waitFor(what, check, { limitMs = 60000, everyMs = 25 } = {}) {
  const deadline = Date.now() + limitMs
  for (;;) {
    const value = await check()
    if (value) return value
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, everyMs))
  }
}

/**
 * Intercepts requests to upload URLs (`<endpoint><id>`, not the endpoint itself) and lets a test
 * decide what happens to each: `decide(request, n)` returns 'continue', 'abort' or 'hold' (the
 * request waits until `open()`; held requests whose page gave up on them are ignored), or
 * ['continue', then] to call `then()` once the request is on its way.
 */
export async function gateUploads(page, endpointPath, decide) {
  const held = []
  let count = 0
  const matcher = (url) => url.pathname.startsWith(endpointPath) && url.pathname.length > endpointPath.length
  const handler = async (route) => {
    count++
    const decided = decide(route.request(), count)
    const [verdict, then] = Array.isArray(decided) ? decided : [decided, null]
    try {
      if (verdict === 'abort') await route.abort('internetdisconnected')
      else if (verdict === 'hold') held.push(route)
      else await route.continue()
    } catch {
      // The page cancelled the request meanwhile.
    }
    then?.()
  }
  await page.route(matcher, handler)
  return {
    /** Lets every held request go on and stops intercepting. */
    async open() {
      await page.unroute(matcher, handler)
      for (const route of held.splice(0)) route.continue().catch(() => {})
    },
    /** Fails every held request (as a dropped connection would). */
    async dropHeld() {
      for (const route of held.splice(0)) await route.abort('connectionreset').catch(() => {})
    },
    get heldCount() {
      return held.length
    },
  }
}

/** The server's offset for an upload (HEAD from Node.js, outside the page). */
export async function serverOffset(url, token) {
  const headers = { 'Tus-Resumable': '1.0.0' }
  if (token) headers.Authorization = `Bearer ${token}`
  const response = await fetch(url, { method: 'HEAD', headers })
  if (!response.ok) throw new Error(`HEAD ${url}: ${response.status}`)
  return Number(response.headers.get('upload-offset'))
}

/**
 * Records, from the browser's side, which protocol each request to the endpoint or an upload URL
 * announced. `take()` counts the requests since the last `take()` by key, such as
 * `{ 'POST ietf': 1, 'PATCH ietf content-digest': 12 }`: the method; then `ietf`
 * (Upload-Draft-Interop-Version and no Tus-Resumable; followed by the version when it is not 9),
 * `tus` (Tus-Resumable only), `both` or `neither`; then the per-chunk digest field, if any.
 * CORS preflights are the browser's own and not among them.
 */
export function recordProtocols(page, endpointUrl) {
  const endpoint = new URL(endpointUrl)
  let counts = {}
  page.on('request', (request) => {
    const url = new URL(request.url())
    if (url.origin !== endpoint.origin || !url.pathname.startsWith(endpoint.pathname)) return
    // The page's request for a signed download link is not part of either upload protocol.
    if (request.method() === 'GET' && url.pathname.endsWith('/link')) {
      counts['GET link'] = (counts['GET link'] ?? 0) + 1
      return
    }
    const headers = request.headers()
    const interop = headers['upload-draft-interop-version']
    const tus = 'tus-resumable' in headers
    let kind = interop !== undefined ? (tus ? 'both' : 'ietf') : tus ? 'tus' : 'neither'
    if (interop !== undefined && interop !== '9') kind += ` ${interop}`
    const digest = ['content-digest', 'upload-checksum'].find((name) => name in headers)
    const key = [request.method(), kind, digest].filter(Boolean).join(' ')
    counts[key] = (counts[key] ?? 0) + 1
  })
  return {
    take() {
      const taken = counts
      counts = {}
      return taken
    },
  }
}
