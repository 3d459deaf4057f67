/* Tissue Atlas portal: the released slides from #portal-data (the same list as index.json), filtered in
 * the browser by slide or marker (no server). Everything from the data goes in as text; links are
 * relative. window.atlasPortal exposes the filter (used by tests). */
(function () {
  "use strict";

  const index = JSON.parse(document.getElementById("portal-data").textContent);
  const slides = index.slides;

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    Object.entries(attrs || {}).forEach(([k, v]) => {
      if (v === null || v === undefined) return;
      if (k === "text") node.textContent = v; else node.setAttribute(k, v);
    });
    (children || []).forEach((child) => node.appendChild(child));
    return node;
  }
  const relative = (path) => (path && !/^[a-z][a-z0-9+.-]*:|^\/\//i.test(path) ? path : null);

  function formatBytes(n) {
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  }
  function usd(x) {
    return x >= 1 ? "$" + x.toFixed(2) : "$" + (x.toFixed(6).replace(/0+$/, "").replace(/\.$/, "") || "0");
  }

  const filterInput = document.getElementById("filter");
  const markerSelect = document.getElementById("marker");
  const cards = [];

  function card(slide) {
    const overview = relative(slide.overview);
    const thumb = relative(slide.thumbnail)
      ? el("a", { href: overview }, [el("img", { class: "thumb", src: relative(slide.thumbnail), loading: "lazy",
                                                 alt: "thumbnail of " + slide.slide_id })])
      : el("div", { class: "thumb" });
    const facts = [slide.run_id, "released " + (slide.released || "?"),
      slide.cells === null || slide.cells === undefined ? "no cell table" : slide.cells.toLocaleString("en") + " cells",
      formatBytes(slide.bytes) + " in " + slide.files + " files"];
    if (slide.waypoints) facts.push(slide.waypoints + " waypoints");
    const chips = el("ul", { class: "chips", "aria-label": "markers" }, slide.markers.map((m) => {
      const button = el("button", { type: "button", text: m, title: "show slides with " + m });
      button.addEventListener("click", () => { markerSelect.value = m; apply(); });
      return el("li", {}, [button]);
    }));
    const rows = slide.levels.map((level) => el("tr", {}, [
      el("td", { text: level.level === null ? "QC" : "Level " + level.level }),
      el("td", { text: level.name }),
      el("td", { text: formatBytes(level.bytes) + " · " + level.files + " files" }),
      el("td", {}, [el("code", { class: "uri", text: level.uri }), el("code", { class: "command", text: level.command })]),
    ]));
    const table = el("table", { class: "levels" }, [
      el("thead", {}, [el("tr", {}, ["Level", "What", "Size", "Where (requester pays)"].map((h) => el("th", { text: h })))]),
      el("tbody", {}, rows)]);
    const cost = el("p", { class: "cost", text: "Download all: about " + usd(slide.download_cost_usd) +
      " to the internet; inside " + index.region + " only the requests, " + usd(slide.download_cost_in_region_usd) +
      " (transfer free)." });
    const node = el("article", { class: "slide", "data-slide": slide.slide_id }, [
      thumb,
      el("div", {}, [el("h2", {}, [el("a", { href: overview, text: slide.slide_id })]),
                     el("p", { class: "facts muted", text: facts.join(" · ") }), chips]),
      table, cost]);
    return node;
  }

  function readHash() {
    const params = new URLSearchParams(window.location.hash.slice(1));
    return { q: params.get("q") || "", marker: params.get("marker") || "" };
  }

  function apply() {
    const q = filterInput.value.trim().toLowerCase();
    const marker = markerSelect.value;
    let shown = 0;
    cards.forEach(({ slide, node }) => {
      const text = [slide.slide_id, slide.run_id].concat(slide.markers).join("\n").toLowerCase();
      const visible = (!q || text.includes(q)) && (!marker || slide.markers.includes(marker));
      node.hidden = !visible;
      node.querySelectorAll(".chips button").forEach((b) => {
        b.classList.toggle("match", b.textContent === marker || (q !== "" && b.textContent.toLowerCase().includes(q)));
      });
      shown += visible ? 1 : 0;
    });
    document.getElementById("shown").textContent = shown + " of " + slides.length + " slides";
    document.getElementById("empty").hidden = shown > 0;
    const params = new URLSearchParams();
    if (filterInput.value.trim()) params.set("q", filterInput.value.trim());
    if (marker) params.set("marker", marker);
    history.replaceState(null, "", params.toString() ? "#" + params.toString() : window.location.pathname);
    return shown;
  }

  const markers = [...new Set(slides.flatMap((s) => s.markers))].sort((a, b) => a.localeCompare(b));
  markers.forEach((m) => markerSelect.appendChild(el("option", { value: m, text: m })));
  const main = document.getElementById("slides");
  slides.forEach((slide) => { const node = card(slide); cards.push({ slide, node }); main.appendChild(node); });
  function fromHash() {
    const wanted = readHash();
    filterInput.value = wanted.q;
    markerSelect.value = markers.includes(wanted.marker) ? wanted.marker : "";
  }
  fromHash();
  window.addEventListener("hashchange", () => { fromHash(); apply(); });
  filterInput.addEventListener("input", apply);
  markerSelect.addEventListener("change", apply);
  document.getElementById("cost-note").textContent = index.cost_note;
  document.getElementById("generated").textContent = index.generated;
  document.getElementById("bucket").textContent = "s3://" + index.results_bucket + " (" + index.region + ")";
  apply();

  window.atlasPortal = {
    apply: apply,
    shown: () => cards.filter(({ node }) => !node.hidden).map(({ slide }) => slide.slide_id),
  };
}());
