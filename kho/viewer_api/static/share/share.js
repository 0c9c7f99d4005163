// kho share page: the study in the page's manifest, one rendered image at a time.
// Swipe left/right (or the buttons, the slider, the arrow keys) for the next image; up/down
// for the next series; presets set the window for CT.  Images are /rendered JPEGs read with
// the page's session cookie; nothing else of the archive is asked for.
(function () {
  "use strict";

  var manifest = JSON.parse(document.getElementById("manifest").textContent);
  var stage = document.getElementById("stage");
  var image = document.getElementById("image");
  var slider = document.getElementById("slider");
  var previous = document.getElementById("previous");
  var next = document.getElementById("next");
  var position = document.getElementById("position");
  var presetsNav = document.getElementById("presets");
  var seriesNav = document.getElementById("series");
  var series = manifest.series;
  var current = { series: 0, image: 0, window: null };
  var SWIPE = 40; // px a finger moves before it counts as a swipe

  // the link's end in the phone's own time zone and language (the page says UTC)
  var until = document.getElementById("until");
  if (until && until.getAttribute("datetime")) {
    until.textContent = new Date(until.getAttribute("datetime")).toLocaleString([], {
      dateStyle: "medium", timeStyle: "short"
    });
  }

  if (!series.length || !image) {
    document.getElementById("controls").hidden = true;
    return;
  }

  // one entry per frame: [instance UID, frame number]
  series.forEach(function (s) {
    s.frames = [];
    s.images.forEach(function (entry) {
      for (var f = 1; f <= entry[1]; f++) s.frames.push([entry[0], f]);
    });
  });

  function seriesBase(s) {
    return manifest.base + "/studies/" + s.study + "/series/" + s.uid;
  }

  function frameUrl(s, index, win) {
    var frame = s.frames[index];
    var url = seriesBase(s) + "/instances/" + frame[0] + "/frames/" + frame[1] +
      "/rendered?viewport=" + manifest.viewport;
    if (win) url += "&window=" + encodeURIComponent(win);
    return url;
  }

  var preloaded = {};
  function preload(s, index) {
    if (index < 0 || index >= s.frames.length) return;
    var url = frameUrl(s, index, current.window);
    if (preloaded[url]) return;
    preloaded[url] = new Image();
    preloaded[url].src = url;
  }

  function show() {
    var s = series[current.series];
    var url = frameUrl(s, current.image, current.window);
    // the first image is in the page already: set the same URL again would refetch it
    if (image.getAttribute("src") !== url) image.setAttribute("src", url);
    image.alt = "Image " + (current.image + 1) + " of series " + (current.series + 1);
    stage.classList.remove("failed");
    slider.max = String(s.frames.length);
    slider.value = String(current.image + 1);
    slider.disabled = s.frames.length < 2;
    previous.disabled = current.image === 0;
    next.disabled = current.image >= s.frames.length - 1;
    position.textContent = "Image " + (current.image + 1) + " of " + s.frames.length +
      " \u00b7 Series " + (current.series + 1) + " of " + series.length +
      (s.label ? " \u00b7 " + s.label : "");
    Array.prototype.forEach.call(seriesNav.children, function (button, i) {
      button.setAttribute("aria-current", i === current.series ? "true" : "false");
    });
    for (var d = 1; d <= 2; d++) {
      preload(s, current.image + d);
      preload(s, current.image - d);
    }
  }

  function step(delta) {
    var s = series[current.series];
    var target = Math.max(0, Math.min(s.frames.length - 1, current.image + delta));
    if (target !== current.image) {
      current.image = target;
      show();
    }
  }

  function chooseSeries(index) {
    if (index < 0 || index >= series.length || index === current.series) return;
    current.series = index;
    // the middle of a stack shows more than its first slice
    current.image = Math.floor((series[index].frames.length - 1) / 2);
    buildPresets();
    show();
  }

  function buildPresets() {
    presetsNav.textContent = "";
    var s = series[current.series];
    var presets = (manifest.presets && manifest.presets[s.modality]) || [];
    if (!presets.length) {
      current.window = null;
      return;
    }
    var all = [["Default", null]].concat(presets);
    var found = all.some(function (p) { return p[1] === current.window; });
    if (!found) current.window = null;
    all.forEach(function (preset) {
      var button = document.createElement("button");
      button.type = "button";
      button.textContent = preset[0];
      button.setAttribute("aria-pressed", preset[1] === current.window ? "true" : "false");
      button.addEventListener("click", function () {
        current.window = preset[1];
        Array.prototype.forEach.call(presetsNav.children, function (b) {
          b.setAttribute("aria-pressed", b === button ? "true" : "false");
        });
        show();
      });
      presetsNav.appendChild(button);
    });
  }

  function buildSeries() {
    if (series.length < 2) return;
    series.forEach(function (s, index) {
      var button = document.createElement("button");
      button.type = "button";
      var thumb = document.createElement("img");
      thumb.loading = "lazy";
      thumb.alt = "";
      thumb.src = seriesBase(s) + "/thumbnail";
      var label = document.createElement("span");
      label.textContent = s.label + " (" + s.frames.length + ")";
      button.appendChild(thumb);
      button.appendChild(label);
      button.addEventListener("click", function () { chooseSeries(index); });
      seriesNav.appendChild(button);
    });
  }

  image.addEventListener("error", function () {
    stage.dataset.message = "This image could not be loaded. Reload the page to try again.";
    stage.classList.add("failed");
  });
  image.addEventListener("load", function () {
    stage.classList.remove("failed");
    document.body.dataset.loaded = "true"; // for tests: an image is on screen
  });
  if (image.complete && image.naturalWidth > 0) document.body.dataset.loaded = "true";

  previous.addEventListener("click", function () { step(-1); });
  next.addEventListener("click", function () { step(1); });
  slider.addEventListener("input", function () {
    current.image = Number(slider.value) - 1;
    show();
  });
  document.addEventListener("keydown", function (event) {
    if (event.key === "ArrowRight") step(1);
    else if (event.key === "ArrowLeft") step(-1);
    else if (event.key === "ArrowDown") chooseSeries(current.series + 1);
    else if (event.key === "ArrowUp") chooseSeries(current.series - 1);
    else return;
    event.preventDefault();
  });

  // swipes: one finger; a mostly horizontal move steps through images, a vertical one
  // through series (left/up = forward, as turning a page)
  var start = null;
  stage.addEventListener("touchstart", function (event) {
    start = event.touches.length === 1
      ? { x: event.touches[0].clientX, y: event.touches[0].clientY }
      : null;
  }, { passive: true });
  stage.addEventListener("touchend", function (event) {
    if (!start || event.changedTouches.length !== 1) return;
    var dx = event.changedTouches[0].clientX - start.x;
    var dy = event.changedTouches[0].clientY - start.y;
    start = null;
    if (Math.abs(dx) >= SWIPE && Math.abs(dx) > Math.abs(dy)) step(dx < 0 ? 1 : -1);
    else if (Math.abs(dy) >= SWIPE) chooseSeries(current.series + (dy < 0 ? 1 : -1));
  });
  // mouse and pen: the same gesture with a pointer drag
  var drag = null;
  stage.addEventListener("pointerdown", function (event) {
    if (event.pointerType === "touch") return;
    drag = { x: event.clientX, y: event.clientY };
  });
  stage.addEventListener("pointerup", function (event) {
    if (!drag) return;
    var dx = event.clientX - drag.x;
    var dy = event.clientY - drag.y;
    drag = null;
    if (Math.abs(dx) >= SWIPE && Math.abs(dx) > Math.abs(dy)) step(dx < 0 ? 1 : -1);
    else if (Math.abs(dy) >= SWIPE) chooseSeries(current.series + (dy < 0 ? 1 : -1));
  });

  // the series opens on its middle frame, as the server chose for the page's first image
  current.image = Math.floor((series[0].frames.length - 1) / 2);
  buildSeries();
  buildPresets();
  show();
})();
