// End-to-end test of the shoppers' page in a real headless browser (Debian's chromium,
// driven by playwright-core): upload a real photo, see a box per detected garment, click
// one, see its shop items, draw a box of our own, filter by category.
//
//   node searcher/tests/browser/page.test.mjs http://127.0.0.1:8080 PHOTO.jpg
//
// Exits non-zero with a message on the first failed expectation.
import { chromium } from "playwright-core";

const [url, photo] = process.argv.slice(2);
if (!url || !photo) {
  console.error("usage: page.test.mjs URL PHOTO");
  process.exit(2);
}
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";

function expect(cond, message) {
  if (!cond) throw new Error("expectation failed: " + message);
}

const browser = await chromium.launch({ executablePath, args: ["--no-sandbox", "--disable-gpu"] });
try {
  const page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(url, { waitUntil: "load" });
  expect((await page.title()).includes("Shoplens"), "the page title names Shoplens");

  // Upload: the file input the drop zone opens.
  const searched = page.waitForResponse((r) => r.url().includes("/v1/search") && r.request().method() === "POST", { timeout: 60000 });
  await page.setInputFiles("#file", photo);
  const response = await searched;
  expect(response.status() === 200, "the search answers 200, got " + response.status());
  await page.waitForSelector("#stage .box", { timeout: 30000 });
  const answer = await page.evaluate(() => window.shoplensAnswer);
  const boxes = await page.locator("#stage .box").count();
  expect(boxes === answer.garments.length && boxes > 0, `one box per garment (${boxes} boxes, ${answer.garments.length} garments)`);
  console.log(`uploaded: ${boxes} garments (${answer.garments.map((g) => g.category).join(", ")})`);

  // Click the last box: its results replace the grid.
  const last = boxes - 1;
  await page.locator("#stage .box").nth(last).click();
  await page.waitForFunction((i) => document.querySelectorAll("#stage .box")[i].classList.contains("selected"), last);
  const cards = await page.locator("#grid .card").count();
  expect(cards === answer.garments[last].results.length && cards > 0, `cards for the clicked garment (${cards})`);
  const heading = await page.locator("#results h2").textContent();
  expect(heading.includes(answer.garments[last].category), `heading names the category: ${heading}`);
  // The result images load from the API.
  await page.waitForFunction(() => [...document.querySelectorAll("#grid img")].every((i) => i.complete && i.naturalWidth > 0), null, { timeout: 30000 });
  console.log(`clicked garment ${last}: ${cards} shop items with images`);

  // Draw a region of our own: one garment, source "region".
  const img = await page.locator("#photo").boundingBox();
  const drawn = page.waitForResponse((r) => r.url().includes("box="), { timeout: 60000 });
  await page.mouse.move(img.x + img.width * 0.2, img.y + img.height * 0.2);
  await page.mouse.down();
  await page.mouse.move(img.x + img.width * 0.7, img.y + img.height * 0.6, { steps: 5 });
  await page.mouse.up();
  expect((await drawn).status() === 200, "the region search answers 200");
  await page.waitForFunction(() => window.shoplensAnswer.garments.length === 1 && document.querySelectorAll("#stage .box").length === 1);
  const region = await page.evaluate(() => window.shoplensAnswer);
  expect(region.garments[0].source === "region", "a drawn box searches that region");
  expect(region.garments[0].category_source === "classifier", "a drawn box's category comes from the category head");
  const regionHeading = await page.locator("#results h2").textContent();
  expect(regionHeading.includes(region.garments[0].category) && regionHeading.includes("guessed"), `the heading says the category was guessed: ${regionHeading}`);
  console.log(`drawn region searched: ${regionHeading}`);

  // The category filter: only that category's garments and items come back.
  const options = await page.locator("#category option").evaluateAll((os) => os.map((o) => o.value).filter(Boolean));
  expect(options.includes("top"), "the filter lists the taxonomy");
  const filtered = page.waitForResponse((r) => r.url().includes("category=footwear"), { timeout: 60000 });
  await page.selectOption("#category", "footwear");
  expect((await filtered).status() === 200, "the filtered search answers 200");
  await page.waitForFunction(() => window.shoplensAnswer.garments.every((g) => g.category === "footwear"));
  const f = await page.evaluate(() => window.shoplensAnswer);
  expect(f.garments.every((g) => g.results.every((r) => r.category === "footwear")), "filtered results are footwear");
  console.log(`filter: ${f.garments.length} garments, all results footwear`);

  expect(errors.length === 0, "no script errors: " + errors.join("; "));
  console.log("browser test passed");
} finally {
  await browser.close();
}
