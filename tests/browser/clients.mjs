// Uploads one file to ferry from a web application on another origin, in headless Chromium, with
// each of: ferry's own module (imported from ferry across origins), tus-js-client, and Uppy with
// @uppy/tus. The application's page is served by this script on 127.0.0.1:--app-port (a real
// server: Chromium lets only pages from the loopback address space call ferry on loopback);
// tus-js-client and Uppy are bundled with esbuild into memory when the script starts. Run by
// tests/api/browser.rs; by hand (ferry started with --cors-origin http://127.0.0.1:8081):
//
//   node clients.mjs --app-port 8081 --endpoint http://127.0.0.1:8080/files/ --file big.bin \
//       --client module --client tusjs
//
// Options: --client (module, tusjs, uppy; repeatable, run in that order in one page), --token (sent
// as Authorization: Bearer), --chunk-size (bytes; for the module the starting and largest size),
// --module-options (JSON, more options for the module's FerryUploader).
// Prints { origin, runs: [{ client, url, ms, requests, events? }] }, where requests counts the
// run's requests by method and protocol (see recordProtocols in lib.mjs).

import { createServer } from 'node:http'
import { dirname } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'

import { build } from 'esbuild'

import { fail, newPage, recordProtocols, withBrowser } from './lib.mjs'

const { values: args } = parseArgs({
  options: {
    endpoint: { type: 'string' },
    'app-port': { type: 'string' },
    file: { type: 'string' },
    client: { type: 'string', multiple: true },
    token: { type: 'string' },
    'chunk-size': { type: 'string', default: String(8 * 1024 * 1024) },
    'module-options': { type: 'string', default: '{}' },
  },
  strict: true,
})
if (!args.endpoint || !args.file || !args.client?.length || !args['app-port']) {
  fail('--app-port, --endpoint, --file and --client are required')
}
const ORIGIN = `http://127.0.0.1:${Number(args['app-port'])}`
const ferry = new URL(args.endpoint).origin
const chunkSize = Number(args['chunk-size'])

// The third-party clients, bundled for the browser in memory (nothing is written).
const bundled = await build({
  stdin: {
    contents: `
      import * as tus from 'tus-js-client'
      import Uppy from '@uppy/core'
      import Tus from '@uppy/tus'
      window.tus = tus
      window.Uppy = Uppy
      window.UppyTus = Tus
    `,
    resolveDir: dirname(fileURLToPath(import.meta.url)),
  },
  bundle: true,
  format: 'iife',
  platform: 'browser',
  write: false,
  logLevel: 'error',
})
const vendor = bundled.outputFiles[0].text

// The application: a file input, the bundle, and ferry's module imported from ferry.
const files = {
  '/': {
    type: 'text/html',
    body: `<!doctype html><meta charset="utf-8"><title>app</title>
      <input type="file" id="file">
      <link rel="icon" href="data:,">
      <script src="/vendor.js"></script>
      <script type="module" src="/app.js"></script>`,
  },
  '/vendor.js': { type: 'text/javascript', body: vendor },
  '/app.js': {
    type: 'text/javascript',
    body: `
      import { FerryUploader } from ${JSON.stringify(`${ferry}/ferry-upload.js`)}
      window.FerryUploader = FerryUploader
      document.body.dataset.ready = 'true'
    `,
  },
}

const runners = {
  module: async ({ endpoint, token, chunkSize, moduleOptions }) => {
    const file = document.getElementById('file').files[0]
    const events = []
    const began = performance.now()
    const uploader = new window.FerryUploader({
      endpoint,
      token: async () => token,
      chunkSize,
      maxChunkSize: chunkSize,
      metadata: { app: 'clients.mjs' },
      ...moduleOptions,
    })
    const upload = uploader.add(file)
    for (const type of ['statechange', 'success', 'error']) uploader.addEventListener(type, (e) => events.push(type === 'statechange' ? e.detail.state : type))
    let progressEvents = 0
    upload.addEventListener('progress', () => progressEvents++)
    const result = await new Promise((resolve, reject) => {
      upload.addEventListener('success', (e) => resolve(e.detail))
      upload.addEventListener('error', (e) => reject(new Error(e.detail.error.message)))
    })
    return {
      url: result.url,
      sha256: result.sha256,
      ms: performance.now() - began,
      events,
      progressEvents,
      stats: upload.stats,
      chunkSize: upload.chunkSize,
      checksums: uploader._checksums,
      maxAppendSize: uploader.maxAppendSize,
      protocol: uploader.protocol,
    }
  },
  tusjs: async ({ endpoint, token, chunkSize }) => {
    const file = document.getElementById('file').files[0]
    const began = performance.now()
    return new Promise((resolve, reject) => {
      const upload = new window.tus.Upload(file, {
        endpoint,
        chunkSize,
        headers: token ? { Authorization: `Bearer ${token}` } : {},
        metadata: { filename: file.name, filetype: file.type || 'application/octet-stream' },
        storeFingerprintForResuming: false,
        retryDelays: [0, 1000],
        onSuccess: () => resolve({ url: upload.url, ms: performance.now() - began }),
        onError: (error) => reject(error),
      })
      upload.start()
    })
  },
  uppy: async ({ endpoint, token, chunkSize }) => {
    const file = document.getElementById('file').files[0]
    const began = performance.now()
    const uppy = new window.Uppy({ autoProceed: false })
    uppy.use(window.UppyTus, {
      endpoint,
      chunkSize,
      headers: token ? { Authorization: `Bearer ${token}` } : {},
      storeFingerprintForResuming: false,
      retryDelays: [0, 1000],
    })
    uppy.addFile({ name: file.name, type: file.type || 'application/octet-stream', data: file, source: 'test' })
    const result = await uppy.upload()
    if (result.failed?.length) throw new Error(`uppy: ${result.failed.map((f) => f.error).join('; ')}`)
    return { url: result.successful[0].uploadURL, ms: performance.now() - began }
  },
}

const app = createServer((request, response) => {
  const found = files[new URL(request.url, ORIGIN).pathname]
  response.writeHead(found ? 200 : 404, { 'Content-Type': `${found?.type ?? 'text/plain'}; charset=utf-8` })
  response.end(found ? found.body : 'not found')
})
await new Promise((resolve, reject) => {
  app.once('error', reject)
  app.listen(Number(args['app-port']), '127.0.0.1', resolve)
})

await withBrowser(async (browser) => {
  const page = await newPage(browser)
  const requests = recordProtocols(page, args.endpoint)
  await page.goto(`${ORIGIN}/`)
  await page.waitForSelector('body[data-ready="true"]', { state: 'attached' })
  await page.setInputFiles('#file', args.file)
  const runs = []
  for (const client of args.client) {
    const runner = runners[client] ?? fail(`unknown --client ${client}`)
    const given = { endpoint: args.endpoint, token: args.token ?? null, chunkSize, moduleOptions: JSON.parse(args['module-options']) }
    const result = await page.evaluate(runner, given)
    runs.push({ client, ...result, requests: requests.take() })
  }
  return { origin: ORIGIN, runs }
})
app.close()
