// Drives ferry's own upload page (web/) in headless Chromium, the way a person would: choose files,
// watch the rows, press the buttons. Run by tests/api/browser.rs; by hand:
//
//   node page.mjs --url 'http://127.0.0.1:8080/?chunkSize=1MiB' --file big.bin --scenario upload
//
// Scenarios (--scenario):
//   upload   choose every --file at once, wait until all are done; --screenshot/--narrow-screenshot
//            save the finished page (desktop width, and 380 px wide)
//   reload   after --after PATCHes went through, reload the page while the next one is on its way;
//            then check the page offers the unfinished upload, choose the file again, wait until done
//   cut      after --after PATCHes, every request to the upload fails (a dropped network) until
//            --failures requests have failed; then the network is back and the upload must finish
//            by itself
//   pause    hold the PATCH after --after, press Pause (--screenshot saves the paused page), watch
//            the server's offset stand still, then press Resume with the keyboard and wait until done
//
// Prints one JSON object: { files: [{ name, state, url, sha256, ms, stats, chunkSize, ... }],
// requests: { 'PATCH tus upload-checksum': 12, ... } (see recordProtocols in lib.mjs), ... }

import { basename } from 'node:path'
import { parseArgs } from 'node:util'

import { fail, gateUploads, newPage, recordProtocols, serverOffset, waitFor, withBrowser } from './lib.mjs'

const { values: args } = parseArgs({
  options: {
    url: { type: 'string' },
    file: { type: 'string', multiple: true },
    scenario: { type: 'string', default: 'upload' },
    after: { type: 'string', default: '2' },
    failures: { type: 'string', default: '4' },
    screenshot: { type: 'string' },
    'narrow-screenshot': { type: 'string' },
  },
  strict: true,
})
if (!args.url || !args.file?.length) fail('--url and --file are required')
const after = Number(args.after)
const endpointPath = new URL(args.url).searchParams.get('endpoint') ?? '/files/'

/** Everything a row shows, read from the page. */
async function rows(page) {
  return page.$$eval('#uploads li.upload', (items) =>
    items.map((li) => ({
      name: li.dataset.name,
      state: li.dataset.state,
      url: li.dataset.url || null,
      sha256: li.querySelector('.result-sha256').textContent || null,
      shownSize: li.querySelector('.result-size').textContent || null,
      status: li.querySelector('.upload-status').textContent,
      error: li.querySelector('.upload-error').hidden ? null : li.querySelector('.upload-error').textContent,
      sent: Number(li.dataset.sent || 0),
      chunkSize: Number(li.dataset.chunkSize || 0),
      resumedFrom: li.dataset.resumedFrom === '' || li.dataset.resumedFrom === undefined ? null : Number(li.dataset.resumedFrom),
      stats: li.dataset.stats ? JSON.parse(li.dataset.stats) : null,
      downloadHref: li.querySelector('.download').hidden ? null : li.querySelector('.download').href,
    })),
  )
}

async function row(page, name) {
  return (await rows(page)).find((r) => r.name === name)
}

async function open(page) {
  await page.goto(args.url)
  await page.waitForSelector('main[data-ready="true"]')
}

/** Waits until the named file's row is done; fails at once when it shows an error. */
async function done(page, name, limitMs = 60000) {
  const selector = `#uploads li.upload[data-name="${name}"]`
  await Promise.race([
    // Done, with its download link (a signed one the page asks ferry for) on show.
    page.waitForSelector(`${selector}[data-state="done"] .download:not([hidden])`, { timeout: limitMs }),
    page.waitForSelector(`${selector}[data-state="error"]`, { timeout: limitMs }).then(async () => {
      throw new Error(`${name} failed on the page: ${JSON.stringify(await row(page, name))}`)
    }),
  ])
  return Date.now()
}

/** Gates the upload's requests: the PATCH after the first `after` gets `verdict()`, all else goes on. */
async function atNextPatch(page, verdict) {
  let patches = 0
  return gateUploads(page, endpointPath, (request) =>
    request.method() === 'PATCH' && ++patches === after + 1 ? verdict() : 'continue',
  )
}

const scenarios = {
  async upload(page) {
    await open(page)
    // The keyboard reaches the file picker first.
    await page.keyboard.press('Tab')
    const firstTab = await page.evaluate(() => document.activeElement?.id ?? null)
    const names = args.file.map((f) => basename(f))
    const began = Date.now()
    await page.setInputFiles('#files', args.file)
    const finished = await Promise.all(names.map((name) => done(page, name)))
    const shown = await rows(page)
    const files = names.map((name, i) => ({ ...shown.find((r) => r.name === name), ms: finished[i] - began }))
    const result = { files, firstTab, announced: await page.textContent('#announce') }
    if (args.screenshot) {
      await page.setViewportSize({ width: 1000, height: 800 })
      await page.locator('#uploads li.upload .pause').first().waitFor({ state: 'hidden' })
      await page.screenshot({ path: args.screenshot, fullPage: true, animations: 'disabled' })
      result.screenshot = args.screenshot
    }
    if (args['narrow-screenshot']) {
      await page.setViewportSize({ width: 380, height: 800 })
      await page.screenshot({ path: args['narrow-screenshot'], fullPage: true, animations: 'disabled' })
      result.narrowScreenshot = args['narrow-screenshot']
      // Nothing may stick out sideways on a phone.
      result.narrowOverflow = await page.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth)
    }
    return result
  },

  async reload(page) {
    const file = args.file[0]
    const name = basename(file)
    await open(page)
    let reloading = null
    // This PATCH goes out, and the page goes away while it is on its way.
    const gate = await atNextPatch(page, () => ['continue', () => (reloading = page.reload())])
    await page.setInputFiles('#files', file)
    await waitFor('the reload', () => reloading)
    await reloading
    await gate.open()
    await page.waitForSelector('main[data-ready="true"]')
    const offered = await page.$$eval('#resumable:not([hidden]) #resumable-list li', (items) => items.map((li) => li.textContent))
    const began = Date.now()
    await page.setInputFiles('#files', file)
    const finished = await done(page, name)
    return { files: [{ ...(await row(page, name)), ms: finished - began }], offered }
  },

  async cut(page) {
    const file = args.file[0]
    const name = basename(file)
    const failures = Number(args.failures)
    await open(page)
    let patches = 0
    let cut = false
    let aborted = 0
    const gate = await gateUploads(page, endpointPath, (request) => {
      if (!cut && request.method() === 'PATCH' && ++patches > after) cut = true
      if (!cut) return 'continue'
      aborted++
      return 'abort'
    })
    const began = Date.now()
    await page.setInputFiles('#files', file)
    await waitFor(`${failures} failed requests`, () => aborted >= failures)
    await page.waitForSelector(`#uploads li.upload[data-name="${name}"][data-state="retrying"]`)
    const during = await row(page, name)
    const offsetDuringCut = await serverOffset(during.url)
    await gate.open()
    const finished = await done(page, name)
    return { files: [{ ...(await row(page, name)), ms: finished - began }], aborted, stateDuringCut: during.state, statusDuringCut: during.status, offsetDuringCut }
  },

  async pause(page) {
    const file = args.file[0]
    const name = basename(file)
    await open(page)
    let held = false
    const gate = await atNextPatch(page, () => {
      held = true
      return 'hold'
    })
    const began = Date.now()
    await page.setInputFiles('#files', file)
    await waitFor('a PATCH on hold', () => held)
    const item = page.locator(`#uploads li.upload[data-name="${name}"]`)
    await item.locator('button.pause').click()
    await page.waitForSelector(`#uploads li.upload[data-name="${name}"][data-state="paused"]`)
    const focusedAfterPause = await page.evaluate(() => document.activeElement?.className ?? null)
    if (args.screenshot) await page.screenshot({ path: args.screenshot, fullPage: true, animations: 'disabled' })
    await gate.dropHeld()
    await gate.open()
    // Paused means nothing moves: the server's offset stays where it is for a while.
    const url = (await row(page, name)).url
    const offsets = []
    for (let i = 0; i < 4; i++) {
      offsets.push(await serverOffset(url))
      await new Promise((resolve) => setTimeout(resolve, 250))
    }
    const sentWhilePaused = (await row(page, name)).sent
    // Resume from the keyboard: focus moved to the Resume button.
    await page.keyboard.press('Enter')
    const finished = await done(page, name)
    return { files: [{ ...(await row(page, name)), ms: finished - began }], patchesBeforePause: after, offsets, sentWhilePaused, focusedAfterPause }
  },
}

const scenario = scenarios[args.scenario] ?? fail(`unknown --scenario ${args.scenario}`)
await withBrowser(async (browser) => {
  const page = await newPage(browser)
  const requests = recordProtocols(page, new URL(endpointPath, args.url).href)
  const result = await scenario(page)
  return { ...result, requests: requests.take() }
})
