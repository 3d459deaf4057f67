/* Tissue Atlas overview page: an OpenSeadragon view of Minerva-layout tiles plus a side panel
 * with the slide's story (waypoints: view, group, description, arrows, boxes).
 * All data is inlined in index.html (#atlas-data), so the page works from any static server
 * and from disk. window.atlasOverview exposes the viewer and the controls (used by tests).
 *
 * Nothing from the data is ever inserted as HTML except waypoint descriptions, which are
 * markdown: marked renders them with raw HTML escaped to text, and DOMPurify sanitizes the
 * result (no script, event handler, javascript: link or form survives). Names, marker names and
 * arrow texts go in as text. */
(function () {
  "use strict";

  const data = JSON.parse(document.getElementById("atlas-data").textContent);
  const exhibit = data.exhibit;
  const panel = data.panel;
  const image = exhibit.Images[0];
  const groups = exhibit.Groups;
  const mask = exhibit.Masks.length ? exhibit.Masks[0] : null;
  const waypoints = (data.story && data.story.waypoints) || [];

  // ---- markdown: raw HTML in the source becomes text; the HTML marked makes is sanitized
  function escapeHtml(text) {
    return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }
  const markdown = new marked.Marked({
    gfm: true,
    async: false,
    renderer: { html: (token) => escapeHtml(token.text) },
  });
  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A" && node.hasAttribute("href")) {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    }
  });
  function renderMarkdown(text) {
    return DOMPurify.sanitize(markdown.parse(String(text || "")), {
      USE_PROFILES: { html: true },
      FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "option", "iframe", "object", "embed"],
      FORBID_ATTR: ["style", "id", "name"],
    });
  }
  const levelNames = { 2: "Level 2 · image", 3: "Level 3 · segmentation", 4: "Level 4 · cell features", 5: "Level 5 · overview" };

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    Object.entries(attrs || {}).forEach(([k, v]) => {
      if (k === "text") node.textContent = v; else node.setAttribute(k, v);
    });
    (children || []).forEach((child) => node.appendChild(child));
    return node;
  }

  function formatBytes(n) {
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  }

  function formatValue(v) {
    if (v === null || v === undefined) return "–";
    if (typeof v === "number") return Number.isInteger(v) ? v.toLocaleString("en") : v.toPrecision(4);
    if (typeof v === "object") return JSON.stringify(v);
    return String(v);
  }

  // ---- tile sources: Minerva layout <Images.Path>/<layer>/<level>_<x>_<y>.<ext>, level 0 = full size
  function tileSource(path, format) {
    return {
      width: image.Width, height: image.Height, tileSize: data.tileSize, tileOverlap: 0,
      minLevel: 0, maxLevel: image.MaxLevel,
      getTileUrl: function (level, x, y) {
        return image.Path + "/" + path + "/" + (image.MaxLevel - level) + "_" + x + "_" + y + "." + format;
      },
    };
  }

  // ---- state in the URL hash: #w=<waypoint>&group=<index>&outlines=1 (w and group from 0)
  function readHash() {
    const params = new URLSearchParams(window.location.hash.slice(1));
    const index = (key, n) => {
      if (!params.has(key)) return null;
      const i = parseInt(params.get(key), 10);
      return i >= 0 && i < n ? i : null;
    };
    return { w: index("w", waypoints.length), group: index("group", groups.length),
             outlines: params.has("outlines") ? params.get("outlines") === "1" : null };
  }
  const initial = readHash();
  const first = waypoints.length ? waypoints[initial.w === null ? 0 : initial.w] : null;
  const state = {
    w: waypoints.length ? (initial.w === null ? 0 : initial.w) : null,
    group: initial.group !== null ? initial.group : (first ? first.group : 0),
    outlines: initial.outlines !== null ? initial.outlines : (first ? first.outlines : false),
  };
  function writeHash() {
    const params = new URLSearchParams();
    if (state.w !== null) params.set("w", String(state.w));
    params.set("group", String(state.group));
    if (state.outlines) params.set("outlines", "1");
    history.replaceState(null, "", "#" + params.toString());
  }

  // ---- viewer
  const viewer = OpenSeadragon({
    id: "viewer",
    prefixUrl: "openseadragon/images/",
    drawer: "canvas",
    tileSources: [tileSource(groups[state.group].Path, groups[state.group].Format || "jpg")],
    showNavigator: true,
    navigatorPosition: "BOTTOM_RIGHT",
    maxZoomPixelRatio: 4,
    visibilityRatio: 0.5,
    animationTime: 0.6,
  });
  let outlineImage = null;
  let readyResolve;
  const ready = new Promise((resolve) => { readyResolve = resolve; });

  viewer.addOnceHandler("open", function () {
    if (state.w !== null) {  // group and outlines are already as the waypoint (or the URL) says
      goTo(waypoints[state.w], true);
      drawMarks(waypoints[state.w]);
    }
    if (!mask) { readyResolve(); return; }
    viewer.addTiledImage({
      tileSource: tileSource(mask.Path, mask.Format || "png"),
      index: 1,
      opacity: state.outlines ? 1 : 0,
      success: function (event) { outlineImage = event.item; readyResolve(); },
      error: function (event) { console.error("outline layer failed to open", event.message); readyResolve(); },
    });
  });
  viewer.addHandler("open-failed", function (event) { console.error("image failed to open", event.message); });

  function setGroup(index) {
    if (index === state.group && viewer.world.getItemCount()) { writeHash(); return; }
    state.group = index;
    const group = groups[index];
    viewer.addTiledImage({ tileSource: tileSource(group.Path, group.Format || "jpg"), index: 0, replace: true,
                           opacity: channelMode ? 0 : 1 });
    document.querySelectorAll("#groups .group").forEach((node, i) => {
      node.classList.toggle("active", i === index);
      node.setAttribute("aria-checked", String(i === index));
    });
    writeHash();
  }

  function setOutlines(on) {
    state.outlines = on;
    document.getElementById("outline-toggle").checked = on;
    if (outlineImage) outlineImage.setOpacity(on ? 1 : 0);
    writeHash();
  }

  // ---- single-channel layers (render.channel_layers): grey tiles, tinted and added up here, so a
  // reader can switch channels on and off and recolour them (as Minerva Story does with them)
  const channelLayers = data.channelLayers || [];
  const channels = channelLayers.map((layer) => ({ on: true, color: layer.color, item: null, adding: false }));
  let channelMode = false;

  viewer.addHandler("tile-invalidated", async (event) => {
    const index = event.tiledImage.source.atlasChannel;
    if (index === undefined) return;
    const ctx = await event.getData("context2d");
    if (!ctx) return;
    ctx.globalCompositeOperation = "multiply";   // grey x colour: the channel in its colour
    ctx.fillStyle = "#" + channels[index].color;
    ctx.fillRect(0, 0, ctx.canvas.width, ctx.canvas.height);
    ctx.globalCompositeOperation = "source-over";
    await event.setData(ctx, "context2d");
  });

  function setChannelMode(on) {
    channelMode = on;
    document.getElementById("channel-mode").checked = on;
    const group = viewer.world.getItemAt(0);
    if (group) group.setOpacity(on ? 0 : 1);
    channels.forEach((channel, i) => {
      if (on && !channel.item && !channel.adding) {
        channel.adding = true;
        viewer.addTiledImage({
          tileSource: Object.assign(tileSource(channelLayers[i].path, "jpg"), { atlasChannel: i }),
          index: viewer.world.getItemCount() - (outlineImage ? 1 : 0),   // below the outlines
          compositeOperation: "lighter",                                 // channels add up
          opacity: channelMode && channel.on ? 1 : 0,
          success: (event) => {
            channel.item = event.item;
            channel.item.setOpacity(channelMode && channel.on ? 1 : 0);
          },
        });
      }
      if (channel.item) channel.item.setOpacity(on && channel.on ? 1 : 0);
    });
  }

  function setChannel(index, change) {
    const channel = channels[index];
    Object.assign(channel, change);
    if (!channelMode) setChannelMode(true);
    if (channel.item) {
      channel.item.setOpacity(channel.on ? 1 : 0);
      if ("color" in change) channel.item.requestInvalidate();
    }
  }

  if (channelLayers.length) {
    document.getElementById("channels-section").hidden = false;
    const modeToggle = document.getElementById("channel-mode");
    modeToggle.addEventListener("change", () => setChannelMode(modeToggle.checked));
    const list = document.getElementById("channel-list");
    channelLayers.forEach((layer, i) => {
      const box = el("input", { type: "checkbox", "aria-label": "show " + layer.name });
      box.checked = true;
      box.addEventListener("change", () => setChannel(i, { on: box.checked }));
      const color = el("input", { type: "color", value: "#" + layer.color, "aria-label": "colour of " + layer.name });
      color.addEventListener("input", () => setChannel(i, { color: color.value.slice(1) }));
      list.appendChild(el("li", {}, [el("label", {}, [box, el("span", { text: layer.name })]), color]));
    });
  }

  // ---- story: waypoints step through views, with arrows and boxes drawn over the image
  function imageItem() { return viewer.world.getItemAt(0); }

  function arrowElement(text) {
    const node = el("div", { class: "wp-arrow" });
    node.innerHTML = '<svg viewBox="0 0 48 48" width="48" height="48" aria-hidden="true">' +
      '<path d="M4 4 L40 40" /><path d="M26 40 L40 40 L40 26" /></svg>';
    if (text) node.appendChild(el("span", { class: "wp-arrow-text", text: text }));
    return node;
  }

  function drawMarks(waypoint) {
    viewer.clearOverlays();
    const item = imageItem();
    if (!item || !waypoint) return;
    waypoint.overlays.forEach((box) => {
      viewer.addOverlay({ element: el("div", { class: "wp-box" }),
                          location: item.imageToViewportRectangle(box[0], box[1], box[2], box[3]) });
    });
    waypoint.arrows.forEach((arrow) => {
      viewer.addOverlay({ element: arrowElement(arrow.text),
                          location: item.imageToViewportCoordinates(arrow.at[0], arrow.at[1]),
                          placement: OpenSeadragon.Placement.BOTTOM_RIGHT });
    });
  }

  function goTo(waypoint, immediately) {
    const item = imageItem();
    if (!item) return;
    const center = item.imageToViewportCoordinates(waypoint.center[0], waypoint.center[1]);
    viewer.viewport.zoomTo(viewer.viewport.getHomeZoom() * waypoint.zoom, null, immediately);
    viewer.viewport.panTo(center, immediately);
  }

  function showWaypoint(index, immediately) {
    if (!waypoints.length) return;
    index = Math.max(0, Math.min(waypoints.length - 1, index));
    const waypoint = waypoints[index];
    state.w = index;
    document.getElementById("wp-name").textContent = waypoint.name;
    document.getElementById("wp-description").innerHTML = renderMarkdown(waypoint.description);
    document.getElementById("wp-count").textContent = (index + 1) + " / " + waypoints.length;
    document.getElementById("wp-prev").disabled = index === 0;
    document.getElementById("wp-next").disabled = index === waypoints.length - 1;
    if (viewer.world.getItemCount()) {
      if (waypoint.group !== state.group) setGroup(waypoint.group);
      setOutlines(waypoint.outlines);
      goTo(waypoint, immediately);
      drawMarks(waypoint);
    }
    writeHash();
  }

  if (waypoints.length) {
    document.getElementById("story-section").hidden = false;
    document.getElementById("story-kind").textContent = data.story.drafted
      ? "Drafted from the data" : "Story";
    document.getElementById("wp-prev").addEventListener("click", () => showWaypoint(state.w - 1));
    document.getElementById("wp-next").addEventListener("click", () => showWaypoint(state.w + 1));
    // capture phase: the viewer's own arrow-key panning does not also see the key
    document.addEventListener("keydown", (event) => {
      if (event.altKey || event.ctrlKey || event.metaKey || event.shiftKey) return;
      if (event.target.closest && event.target.closest("input, textarea, select, [contenteditable]")) return;
      if (event.key !== "ArrowRight" && event.key !== "ArrowLeft") return;
      event.preventDefault();
      event.stopPropagation();
      showWaypoint(state.w + (event.key === "ArrowRight" ? 1 : -1));
    }, true);
    window.addEventListener("hashchange", () => {
      const wanted = readHash().w;
      if (wanted !== null && wanted !== state.w) showWaypoint(wanted);
    });
    showWaypoint(state.w, true);  // the panel now; the view once the image is open
  }

  // ---- side panel
  document.getElementById("slide-id").textContent = panel.slideId;
  document.getElementById("run-id").textContent = panel.runId ? "run " + panel.runId : "";
  const img = panel.image;
  let facts = img.width.toLocaleString("en") + " × " + img.height.toLocaleString("en") + " px · " +
    img.channels + " channels · " + img.dtype;
  if (img.pixelSizeUm) {
    facts += " · " + img.pixelSizeUm.toPrecision(3) + " µm/px (" +
      (img.width * img.pixelSizeUm / 1000).toFixed(2) + " × " + (img.height * img.pixelSizeUm / 1000).toFixed(2) + " mm)";
  }
  document.getElementById("image-facts").textContent = facts;

  const groupList = document.getElementById("groups");
  panel.groups.forEach((group, i) => {
    const legend = el("ul", { class: "legend" }, group.channels.map((c) => el("li", {
      title: "display range " + formatValue(c.low) + " – " + formatValue(c.high),
    }, [el("span", { class: "swatch", style: "background:#" + c.color }), el("span", { text: c.name })])));
    const button = el("button", { class: "group", type: "button", role: "radio", "data-index": String(i) },
      [el("span", { class: "group-name", text: group.name }), legend]);
    button.addEventListener("click", () => setGroup(i));
    groupList.appendChild(button);
  });
  document.querySelectorAll("#groups .group").forEach((node, i) => {
    node.classList.toggle("active", i === state.group);
    node.setAttribute("aria-checked", String(i === state.group));
  });

  if (mask) {
    document.getElementById("layers-section").hidden = false;
    document.getElementById("outline-label").textContent = mask.Name;
    const toggle = document.getElementById("outline-toggle");
    toggle.checked = state.outlines;
    toggle.addEventListener("change", () => setOutlines(toggle.checked));
  }

  document.getElementById("cell-count").textContent = panel.cellCount === null || panel.cellCount === undefined
    ? "No cell table in this run." : panel.cellCount.toLocaleString("en") + " segmented cells";

  const markerRows = document.querySelector("#markers tbody");
  panel.markers.forEach((m) => markerRows.appendChild(el("tr", {}, [
    el("td", { text: String(m.channel) }), el("td", { text: m.name }), el("td", { text: m.group }),
  ])));

  const qcStages = Object.keys(panel.qc || {}).sort();
  if (qcStages.length) {
    document.getElementById("qc-section").hidden = false;
    const qc = document.getElementById("qc");
    qcStages.forEach((stage) => {
      const summary = panel.qc[stage].summary || {};
      const rows = Object.keys(summary).map((key) => el("tr", {}, [
        el("th", { text: key }), el("td", { text: formatValue(summary[key]) }),
      ]));
      const links = (panel.qc[stage].files || []).map((path) => el("li", {}, [
        el("a", { href: "../" + path, text: path.split("/").pop() }),
      ]));
      qc.appendChild(el("details", {}, [el("summary", { text: stage }), el("table", { class: "kv" }, rows),
        el("ul", { class: "files" }, links)]));
    });
  }

  if (panel.data && panel.data.length) {
    document.getElementById("data-section").hidden = false;
    const dataList = document.getElementById("data");
    const byLevel = {};
    panel.data.forEach((f) => { (byLevel[f.level] = byLevel[f.level] || []).push(f); });
    Object.keys(byLevel).sort().forEach((level) => {
      const items = byLevel[level].map((f) => {
        const children = [el("a", { href: "../" + f.path, text: f.path }), el("span", { class: "muted", text: f.size == null ? "" : " " + formatBytes(f.size) })];
        if (f.uri) children.push(el("code", { class: "uri", text: f.uri }));
        return el("li", {}, children);
      });
      dataList.appendChild(el("h3", { text: levelNames[level] || "Level " + level }));
      dataList.appendChild(el("ul", { class: "files" }, items));
    });
    if (panel.data.some((f) => f.uri)) {
      dataList.appendChild(el("p", { class: "muted", text: "S3 copies are requester-pays: aws s3 cp URI . --request-payer requester" }));
    }
  }
  document.getElementById("viewer-version").textContent = data.viewer;

  // ---- scale bar (when the pixel size is known)
  const scalebar = document.getElementById("scalebar");
  function updateScalebar() {
    if (!img.pixelSizeUm || !viewer.world.getItemCount()) { scalebar.hidden = true; return; }
    const item = viewer.world.getItemAt(0);
    const imagePxPerScreenPx = 1 / item.viewportToImageZoom(viewer.viewport.getZoom(true));
    const umPerScreenPx = imagePxPerScreenPx * img.pixelSizeUm;
    const target = 120 * umPerScreenPx;
    const magnitude = Math.pow(10, Math.floor(Math.log10(target)));
    const nice = [5, 2, 1].map((f) => f * magnitude).find((v) => v <= target) || magnitude;
    document.getElementById("scalebar-bar").style.width = (nice / umPerScreenPx).toFixed(1) + "px";
    document.getElementById("scalebar-label").textContent = nice >= 1000 ? nice / 1000 + " mm" : nice + " µm";
    scalebar.hidden = false;
  }
  viewer.addHandler("animation", updateScalebar);
  viewer.addHandler("open", updateScalebar);

  window.atlasOverview = { viewer: viewer, setGroup: setGroup, setOutlines: setOutlines, showWaypoint: showWaypoint,
                           setChannelMode: setChannelMode, setChannel: setChannel, channels: channels,
                           waypoints: waypoints, ready: ready, state: state };
}());
