// The account pages' one nicety: times as the reader's local time (the server sends unix seconds).
"use strict";
for (const element of document.querySelectorAll("time[data-t]")) {
  const at = new Date(Number(element.dataset.t) * 1000);
  element.dateTime = at.toISOString();
  element.textContent = at.toLocaleString();
}
