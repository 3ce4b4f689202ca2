module github.com/partialfc/partialfc/examples/go/identify

go 1.19

require github.com/partialfc/partialfc/bindings/go/partialfc v0.1.0

replace github.com/partialfc/partialfc/bindings/go/partialfc => ../../../bindings/go/partialfc
