// Small progressive enhancement; every page works without it.
(function () {
  "use strict";
  function delta(target) {
    var s = Math.round((target - Date.now()) / 1000), ahead = s >= 0;
    s = Math.abs(s);
    var d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    var text = d ? d + "d " + h + "h" : (h ? h + "h " + m + "m" : m + "m");
    return ahead ? "in " + text : text + " ago";
  }
  function tick() {
    document.querySelectorAll("time[data-countdown]").forEach(function (el) {
      var t = Date.parse(el.getAttribute("datetime"));
      if (!isNaN(t)) { el.textContent = delta(t); }
    });
  }
  document.addEventListener("DOMContentLoaded", function () {
    tick();
    setInterval(tick, 30000);
    // Destructive forms ask first; the server still decides who may.
    document.querySelectorAll("form[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (ev) {
        if (!window.confirm(form.getAttribute("data-confirm"))) { ev.preventDefault(); }
      });
    });
    // A second click while the first request runs would only be refused: disable it.
    document.querySelectorAll("form[method=post]").forEach(function (form) {
      form.addEventListener("submit", function (ev) {
        if (ev.defaultPrevented) { return; }
        form.querySelectorAll("button[type=submit]").forEach(function (b) { b.setAttribute("aria-busy", "true"); });
      });
    });
  });
})();
