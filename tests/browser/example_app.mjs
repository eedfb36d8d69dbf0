// The example app of examples/python in headless Chromium: log in through its form, choose a file,
// and wait until its page (templates/upload.html, which imports ferry-upload.js from ferry and asks
// the app for upload tokens) says the upload is done. Run by tests/api/browser.rs; by hand:
//
//   node example_app.mjs --app http://127.0.0.1:8000 --user alice --file big.bin
//
// Prints { text } : what the page says about the file once done (or failed).

import { parseArgs } from 'node:util'

import { fail, newPage, withBrowser } from './lib.mjs'

const { values: args } = parseArgs({
  options: {
    app: { type: 'string' },
    user: { type: 'string', default: 'alice' },
    file: { type: 'string' },
  },
  strict: true,
})
if (!args.app || !args.file) fail('--app and --file are required')

await withBrowser(async (browser) => {
  const page = await newPage(browser)
  await page.goto(`${args.app}/`)
  await page.fill('input[name="username"]', args.user)
  await page.fill('input[name="password"]', args.user)
  await Promise.all([page.waitForNavigation(), page.click('button:has-text("Log in")')])
  await page.setInputFiles('#file', args.file)
  const item = page.locator('#uploads li').first()
  await page.waitForFunction(() => /done|failed/.test(document.querySelector('#uploads li')?.textContent ?? ''), null, {
    timeout: 60000,
  })
  return { text: (await item.textContent()).trim(), status: await page.textContent('#status') }
})
