// Screenshots of the shoppers' page for a person to look at: uploads each photo, then
// clicks through its garments, one PNG per garment (the photo with its boxes beside the
// shop items of the selected one).
//
//   node searcher/tests/browser/shot.mjs http://127.0.0.1:8080 OUT_DIR PHOTO.jpg ...
import { chromium } from "playwright-core";

const [url, out, ...photos] = process.argv.slice(2);
if (!url || !out || photos.length === 0) {
  console.error("usage: shot.mjs URL OUT_DIR PHOTO...");
  process.exit(2);
}
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium", args: ["--no-sandbox", "--disable-gpu"] });
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
  await page.goto(url, { waitUntil: "load" });
  for (const [p, photo] of photos.entries()) {
    const searched = page.waitForResponse((r) => r.url().includes("/v1/search"), { timeout: 60000 });
    await page.setInputFiles("#file", photo);
    await searched;
    await page.waitForSelector("#stage .box", { timeout: 30000 });
    const answer = await page.evaluate(() => window.shoplensAnswer);
    for (let i = 0; i < answer.garments.length; i++) {
      // Boxes overlap (a top over a dress): dispatch the click to this box itself.
      await page.locator("#stage .box").nth(i).dispatchEvent("click");
      await page.waitForFunction(() => [...document.querySelectorAll("#grid img")].every((im) => im.complete), null, { timeout: 30000 });
      const g = answer.garments[i];
      const kinds = g.results.map((r) => r.category).join(",");
      console.log(`${photo} garment ${i}: ${g.category} (${g.category_source}) first=${JSON.stringify(g.ranked_first)} results: ${kinds}`);
      await page.screenshot({ path: `${out}/photo${p}-garment${i}.png` });
    }
  }
} finally {
  await browser.close();
}
