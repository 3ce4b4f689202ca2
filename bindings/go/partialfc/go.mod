module partialfc.dev/bindings/go/partialfc

go 1.19
