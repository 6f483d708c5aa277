"""Direct unit tests of the pure modules, in folders that mirror app/thox
(api, engine, store, web); each folder is a package so its test modules do
not clash with same-named ones elsewhere under tests/."""
