module github.com/partialfc/partialfc/bindings/go/partialfc

go 1.19
