// The geometry of drawing a box on a frame: pure functions from a drag on the displayed frame to the box
// in the frame's own pixels, which POST /predict takes as bbox=x,y,w,h. No DOM here, so that it can be tested alone.
(function (root) {
  "use strict";

  // The display scale (≤ 1) that fits a width × height frame into maxWidth × maxHeight.
  function fit(width, height, maxWidth, maxHeight) {
    return Math.min(1, maxWidth / width, maxHeight / height);
  }

  var MIN_DRAG = 3;   // displayed pixels: a shorter drag either way is a click, not a box

  // Two corners of a drag, in displayed pixels, → {x, y, w, h} in frame pixels: whole pixels, every pixel the
  // drag touched, clamped to the frame. Null for a click (under MIN_DRAG either way) or a box outside the frame.
  function fromDrag(x0, y0, x1, y1, scale, width, height) {
    if (Math.abs(x1 - x0) < MIN_DRAG || Math.abs(y1 - y0) < MIN_DRAG) { return null; }
    var clamp = function (v, hi) { return Math.max(0, Math.min(hi, v)); };
    var left = clamp(Math.floor(Math.min(x0, x1) / scale), width);
    var top = clamp(Math.floor(Math.min(y0, y1) / scale), height);
    var right = clamp(Math.ceil(Math.max(x0, x1) / scale), width);
    var bottom = clamp(Math.ceil(Math.max(y0, y1) / scale), height);
    if (right - left < 1 || bottom - top < 1) { return null; }
    return { x: left, y: top, w: right - left, h: bottom - top };
  }

  // "x,y,w,h" typed by hand → a box inside the frame, or null when it is not four numbers with w, h > 0 and
  // at least one pixel inside the frame (the server refuses those too).
  function parse(text, width, height) {
    var parts = String(text).trim().replace(/^[\[(]|[\])]$/g, "").split(/[\s,]+/).filter(Boolean).map(Number);
    if (parts.length !== 4 || !parts.every(isFinite)) { return null; }
    var b = { x: parts[0], y: parts[1], w: parts[2], h: parts[3] };
    if (b.w <= 0 || b.h <= 0 || b.x >= width || b.y >= height || b.x + b.w <= 0 || b.y + b.h <= 0) { return null; }
    return b;
  }

  // The form value of a box.
  function format(b) { return [b.x, b.y, b.w, b.h].join(","); }

  // The part of the box inside the frame, as the server crops it (for the thumbnail of the answer card).
  function visible(b, width, height) {
    var left = Math.max(0, Math.floor(b.x)), top = Math.max(0, Math.floor(b.y));
    var right = Math.min(width, Math.ceil(b.x + b.w)), bottom = Math.min(height, Math.ceil(b.y + b.h));
    return { x: left, y: top, w: right - left, h: bottom - top };
  }

  var api = { fit: fit, fromDrag: fromDrag, parse: parse, format: format, visible: visible };
  if (typeof module !== "undefined" && module.exports) { module.exports = api; } else { root.TaxonomistBox = api; }
}(this));
